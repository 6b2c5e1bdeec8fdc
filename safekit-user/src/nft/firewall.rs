//! `safekit firewall add|remove`: opens the cluster's ports (SPEC §3) to
//! the cluster's nodes in a table of its own, `inet safekit_firewall`:
//!
//! ```text
//! table inet safekit_firewall {
//!   set nodes4 { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 } }
//!   set nodes6 { type ipv6_addr; ... }                  # when a node has one
//!   chain input {             # type filter hook input priority filter; policy accept
//!     ip saddr @nodes4 udp dport 8888 counter accept     # heartbeats
//!     ip saddr @nodes4 tcp dport 5600 counter accept     # replication
//!     ip saddr @nodes4 tcp dport 9010 counter accept     # HTTP
//!     ip saddr @nodes4 tcp dport 9453 counter accept     # HTTPS
//!     (the same from @nodes6)
//!   }
//! }
//! ```
//!
//! Adding replaces the whole table in one transaction, so adding twice
//! leaves the same ruleset and a changed config replaces the old one;
//! removing a table that is not there is not an error.
//!
//! nftables runs every base chain of a hook: an `accept` here lets the
//! packet through this table only. A host whose own nftables ruleset drops
//! by default must accept these ports in its own chain too (for example
//! `ip saddr @nodes4 ...` rules copied from `nft list table inet
//! safekit_firewall`). With iptables-nft or a policy-accept host, this table
//! is all there is to do.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use nftnl::{Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table, set::Set};
use safekit_common::{PROTO_TCP, PROTO_UDP};

use super::{
    NftError,
    expr::{self, Base, Cmp, MetaKey, R0, Verdict},
    netlink::{Netlink, Tx},
};
use crate::config::ClusterConfig;

/// The firewall's table (family `inet`).
pub const TABLE: &str = "safekit_firewall";
const TABLE_C: &CStr = c"safekit_firewall";
const CHAIN: &CStr = c"input";
/// `NF_IP_PRI_FILTER`.
const PRIORITY: i32 = 0;
/// `NFPROTO_IPV4` / `NFPROTO_IPV6` as `meta nfproto` holds them.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// A port opened to the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenPort {
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// Port.
    pub port: u16,
    /// What it carries.
    pub what: &'static str,
}

/// The ports of a cluster (heartbeats, replication, HTTP, HTTPS).
#[must_use]
pub fn ports(cluster: &ClusterConfig) -> Vec<OpenPort> {
    let p = cluster.ports;
    vec![
        OpenPort {
            proto: PROTO_UDP,
            port: p.heartbeat,
            what: "heartbeats",
        },
        OpenPort {
            proto: PROTO_TCP,
            port: p.replication,
            what: "replication",
        },
        OpenPort {
            proto: PROTO_TCP,
            port: p.http,
            what: "HTTP",
        },
        OpenPort {
            proto: PROTO_TCP,
            port: p.https,
            what: "HTTPS",
        },
    ]
}

/// Every address of every node, on every LAN.
#[must_use]
pub fn node_addresses(cluster: &ClusterConfig) -> BTreeSet<IpAddr> {
    cluster
        .nodes
        .iter()
        .flat_map(|n| n.addrs.values().copied())
        .collect()
}

fn table() -> Table {
    Table::new(TABLE_C, ProtoFamily::Inet)
}

/// Installs (or replaces) the table that accepts the cluster's ports from
/// the cluster's node addresses.
pub fn add(cluster: &ClusterConfig) -> Result<(), NftError> {
    let addrs = node_addresses(cluster);
    let v4: Vec<Ipv4Addr> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Addr> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    let table = table();
    let mut tx = Tx::new();
    tx.add(&table, MsgType::Add, "table");
    tx.add(&table, MsgType::Del, "previous table");
    tx.add(&table, MsgType::Add, "table");
    let mut chain = Chain::new(CHAIN, &table);
    chain.set_hook(Hook::In, PRIORITY);
    chain.set_type(ChainType::Filter);
    chain.set_policy(Policy::Accept);
    tx.add(&chain, MsgType::Add, "input chain");
    let ports = ports(cluster);
    if !v4.is_empty() {
        let mut set = Set::<Ipv4Addr>::new_named(c"nodes4", 1, &table, ProtoFamily::Inet);
        for a in &v4 {
            set.add(a);
        }
        tx.add(&set, MsgType::Add, "set nodes4");
        tx.add_elems(&set, MsgType::Add, "IPv4 node addresses");
        for p in &ports {
            let rule = open_rule(&chain, NFPROTO_IPV4, (12, 4), (c"nodes4", 1), *p);
            tx.add(&rule, MsgType::Add, format!("IPv4 rule for {}", p.what));
        }
    }
    if !v6.is_empty() {
        let mut set = Set::<Ipv6Addr>::new_named(c"nodes6", 2, &table, ProtoFamily::Inet);
        for a in &v6 {
            set.add(a);
        }
        tx.add(&set, MsgType::Add, "set nodes6");
        tx.add_elems(&set, MsgType::Add, "IPv6 node addresses");
        for p in &ports {
            let rule = open_rule(&chain, NFPROTO_IPV6, (8, 16), (c"nodes6", 2), *p);
            tx.add(&rule, MsgType::Add, format!("IPv6 rule for {}", p.what));
        }
    }
    Netlink::open()?.apply("adding the cluster firewall", tx)
}

/// `meta nfproto F <saddr> @set meta l4proto P th dport N counter accept`.
fn open_rule<'a>(
    chain: &'a Chain<'a>,
    nfproto: u8,
    (saddr_off, saddr_len): (u32, u32),
    (set, set_id): (&CStr, u32),
    p: OpenPort,
) -> Rule<'a> {
    let mut rule = Rule::new(chain);
    for e in [
        expr::meta(MetaKey::NfProto, R0),
        expr::cmp(R0, Cmp::Eq, &[nfproto]),
        expr::load(Base::Network, saddr_off, saddr_len, R0),
        expr::lookup(R0, set, set_id),
        expr::meta(MetaKey::L4Proto, R0),
        expr::cmp(R0, Cmp::Eq, &[p.proto]),
        expr::load(Base::Transport, 2, 2, R0),
        expr::cmp(R0, Cmp::Eq, &p.port.to_be_bytes()),
        expr::counter(),
        expr::verdict(&Verdict::Accept),
    ] {
        rule.add_expr(&e);
    }
    rule
}

/// Removes the table; not an error when it is not there.
pub fn remove() -> Result<(), NftError> {
    let table = table();
    let mut tx = Tx::new();
    tx.add(&table, MsgType::Add, "table");
    tx.add(&table, MsgType::Del, "table");
    Netlink::open()?.apply("removing the cluster firewall", tx)
}
