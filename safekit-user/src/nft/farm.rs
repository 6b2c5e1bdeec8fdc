//! The nftables farm filter: same API and same decisions as the XDP
//! [`FarmFilter`](crate::farm::filter::FarmFilter); see the module docs of
//! [`crate::nft`] for the ruleset.

use std::{
    ffi::{CStr, CString},
    net::Ipv4Addr,
    sync::{Mutex, PoisonError},
};

use nftnl::{
    Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table, nftnl_sys as sys, set::Set,
};
use safekit_common::{BUCKETS, FILTER_CLIENT_IP, MAX_VIPS, PROTO_TCP, PROTO_UDP, counter};

use super::{
    NftError,
    arp_responder::ArpResponder,
    expr::{self, Base, Cmp, Expr, MetaKey, R0, R1, Verdict},
    netlink::{Netlink, Obj, TABLE_F_OWNER, TableMsg, Tx, cstring},
};
use crate::farm::filter::{AttachMode, FilterRule};

/// Priority of the ingress chain: before any other netdev ingress chain
/// of usual rulesets.
const PRIORITY: i32 = -500;
/// The base chain.
const BASE: &CStr = c"ingress";
/// `ETH_P_IP` as `skb->protocol` holds it (network order).
const ETH_P_IP_BE: [u8; 2] = [0x08, 0x00];
/// `PACKET_HOST`: the frame is for this host.
const PACKET_HOST: u8 = 0;

/// Named counters, by `safekit_common::counter` index (ARP replies come
/// from the user-space responder).
const COUNTERS: [(u32, &CStr); 6] = [
    (counter::PASS_OTHER, c"pass_other"),
    (counter::ACCEPT, c"accepted"),
    (counter::DROP_NOT_OWNER, c"drop_not_owner"),
    (counter::DROP_MALFORMED, c"drop_malformed"),
    (counter::PASS_NO_RULE, c"pass_no_rule"),
    (counter::DROP_FRAGMENT, c"drop_fragment"),
];

fn counter_name(index: u32) -> &'static CStr {
    COUNTERS
        .iter()
        .find(|(i, _)| *i == index)
        .map_or(c"pass_other", |(_, n)| n)
}

/// A bucket as a set key: the `u32` the `hash` expression leaves in its
/// register, in host order (nft type `mark`, 32-bit host order).
struct Bucket(u32);

impl nftnl::set::SetKey for Bucket {
    /// nft's `TYPE_MARK`: printed as a host-order 32-bit number.
    const TYPE: u32 = 19;
    const LEN: u32 = 4;

    fn data(&self) -> Box<[u8]> {
        Box::new(self.0.to_ne_bytes())
    }
}

/// One declared VIP.
#[derive(Debug, Clone)]
struct Vip {
    addr: Ipv4Addr,
    /// Kept for the user-space ARP responder (nftables cannot answer ARP).
    vmac: [u8; 6],
    rules: Vec<FilterRule>,
    owned: Vec<bool>,
}

/// Filter settings given by [`NftFilter::enable`].
#[derive(Debug, Clone, Copy)]
struct Enabled {
    ifmac: [u8; 6],
    seed: u32,
}

/// The nftables farm filter of one interface: a `netdev` table
/// `safekit_farm_<interface>` owned by this value's netlink socket
/// (`NFT_TABLE_F_OWNER`), removed when this value is dropped or its
/// process dies (as the XDP program's BPF link is).
pub struct NftFilter {
    /// The socket that owns the table: kept open for the filter's lifetime.
    nl: Mutex<Netlink>,
    interface: String,
    ifindex: u32,
    table: CString,
    /// Answers ARP for the VIPs once enabled.
    arp: Option<ArpResponder>,
    enabled: Option<Enabled>,
    slots: Vec<Option<Vip>>,
}

impl std::fmt::Debug for NftFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftFilter")
            .field("interface", &self.interface)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn chain_name(slot: usize) -> CString {
    cstring(&format!("vip{slot}"))
}

fn set_name(slot: usize) -> CString {
    cstring(&format!("owned{slot}"))
}

fn set_id(slot: usize) -> u32 {
    u32::try_from(slot).unwrap_or(0) + 1
}

fn bucket(b: usize) -> u32 {
    u32::try_from(b).unwrap_or(u32::MAX)
}

/// The set of owned buckets of a slot, as created: 256 elements at most
/// (the kernel then picks its fixed-size hash for 4-byte keys), keys
/// marked host-order for `nft list` (user data `KEYBYTEORDER` =
/// `BYTEORDER_HOST_ENDIAN`), so buckets print as their numbers.
fn owned_set(table: &Table, slot: usize) -> Set<'_, Bucket> {
    const BYTEORDER_HOST_ENDIAN: u32 = 1;
    let set = Set::<Bucket>::new_named(&set_name(slot), set_id(slot), table, ProtoFamily::NetDev);
    let raw = set.as_ptr().as_ptr();
    // SAFETY: `raw` is the live set; libnftnl copies integers and data into
    // it. The user-data buffer is allocated, filled, copied and freed here.
    unsafe {
        sys::nftnl_set_set_u32(raw, attr16(sys::NFTNL_SET_DESC_SIZE), BUCKETS);
        let ud = sys::nftnl_udata_buf_alloc(64);
        if !ud.is_null() {
            if sys::nftnl_udata_put_u32(
                ud,
                u8::try_from(sys::NFTNL_UDATA_SET_KEYBYTEORDER).unwrap_or(0),
                BYTEORDER_HOST_ENDIAN,
            ) {
                sys::nftnl_set_set_data(
                    raw,
                    attr16(sys::NFTNL_SET_USERDATA),
                    sys::nftnl_udata_buf_data(ud),
                    sys::nftnl_udata_buf_len(ud),
                );
            }
            sys::nftnl_udata_buf_free(ud);
        }
    }
    set
}

fn attr16(a: u32) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}

fn push_rule(tx: &mut Tx, chain: &Chain<'_>, exprs: &[Expr], label: String) {
    let mut rule = Rule::new(chain);
    for e in exprs {
        rule.add_expr(e);
    }
    tx.add(&rule, MsgType::Add, label);
}

/// Deletes every rule of a chain (a rule message with no handle).
fn flush(tx: &mut Tx, chain: &Chain<'_>) {
    let label = format!("flushing chain {}", chain.get_name().to_string_lossy());
    tx.add(&Rule::new(chain), MsgType::Del, label);
}

/// The end of an accepting rule: count, make the frame the host's (as the
/// XDP program's destination MAC rewrite does: `eth_type_trans` then sets
/// `PACKET_HOST`), accept.
fn accept_tail(ifmac: [u8; 6]) -> Vec<Expr> {
    vec![
        expr::counter_ref(counter_name(counter::ACCEPT)),
        expr::immediate(R0, &[PACKET_HOST]),
        expr::meta_set(MetaKey::PktType, R0),
        expr::immediate(R0, &ifmac),
        expr::write_link(0, 6, R0),
        expr::verdict(&Verdict::Accept),
    ]
}

/// `<key> @owned<slot>`: the bucket of the client, looked up in the set
/// of owned buckets. Keys as in `safekit_common`: the source address (4
/// bytes), or the source address then the source port zero-padded to 4
/// bytes (8 bytes: two adjacent 32-bit registers, as an nft concatenation
/// `ip saddr . th sport` lays them out).
fn owned_lookup(filter: u32, seed: u32, slot: usize) -> Vec<Expr> {
    let set = set_name(slot);
    let mut v = vec![expr::load(Base::Network, 12, 4, R0)];
    if filter == FILTER_CLIENT_IP {
        v.push(expr::jhash(R0, 4, BUCKETS, seed, R0));
    } else {
        v.push(expr::load(Base::Transport, 0, 2, R1));
        v.push(expr::jhash(R0, 8, BUCKETS, seed, R0));
    }
    v.push(expr::lookup(R0, &set, set_id(slot)));
    v
}

fn count_and(index: u32, verdict: &Verdict) -> [Expr; 2] {
    [
        expr::counter_ref(counter_name(index)),
        expr::verdict(verdict),
    ]
}

/// The ports are readable: loading 4 bytes of the transport header works
/// (any value is `>= 0`).
fn ports_readable() -> [Expr; 2] {
    [
        expr::load(Base::Transport, 0, 4, R0),
        expr::cmp(R0, Cmp::Gte, &[0; 4]),
    ]
}

/// The rules of one VIP that the filter applies, in lookup order: one
/// per (proto, port), the last given winning as in the XDP rule map,
/// TCP/UDP only (the only protocols XDP balances), exact ports first.
fn effective_rules(rules: &[FilterRule]) -> Vec<FilterRule> {
    let mut out: Vec<FilterRule> = Vec::new();
    for r in rules {
        if r.proto != PROTO_TCP && r.proto != PROTO_UDP {
            continue;
        }
        out.retain(|o| (o.proto, o.port) != (r.proto, r.port));
        out.push(*r);
    }
    out.sort_by_key(|r| r.port == 0);
    out
}

/// Rules of chain `vip<slot>`, in the order of the XDP program's checks.
fn vip_rules(tx: &mut Tx, table: &Table, slot: usize, vip: &Vip, on: Enabled) {
    let chain = Chain::new(chain_name(slot), table);
    flush(tx, &chain);
    let n = format!("rule of VIP {}", vip.addr);
    let drop = Verdict::Drop;
    let accept = Verdict::Accept;
    // Not an IPv4 header: version != 4, or header shorter than 20 bytes.
    let mut r = vec![
        expr::load(Base::Network, 0, 1, R0),
        expr::and(R0, &[0xf0]),
        expr::cmp(R0, Cmp::Neq, &[0x40]),
    ];
    r.extend(count_and(counter::DROP_MALFORMED, &drop));
    push_rule(tx, &chain, &r, format!("{n} (IP version)"));
    let mut r = vec![
        expr::load(Base::Network, 0, 1, R0),
        expr::and(R0, &[0x0f]),
        expr::cmp(R0, Cmp::Lt, &[5]),
    ];
    r.extend(count_and(counter::DROP_MALFORMED, &drop));
    push_rule(tx, &chain, &r, format!("{n} (IP header length)"));
    // Neither TCP nor UDP: no rule can match.
    let mut r = vec![
        expr::load(Base::Network, 9, 1, R0),
        expr::cmp(R0, Cmp::Neq, &[PROTO_TCP]),
        expr::cmp(R0, Cmp::Neq, &[PROTO_UDP]),
    ];
    r.extend(count_and(counter::PASS_NO_RULE, &accept));
    push_rule(tx, &chain, &r, format!("{n} (other protocols)"));
    // Non-first fragments carry no ports.
    let frag = [
        expr::load(Base::Network, 6, 2, R0),
        expr::and(R0, &[0x1f, 0xff]),
        expr::cmp(R0, Cmp::Neq, &[0, 0]),
    ];
    if vip.rules.iter().all(|r| r.filter == FILTER_CLIENT_IP) {
        let mut r = frag.to_vec();
        r.extend(owned_lookup(FILTER_CLIENT_IP, on.seed, slot));
        r.extend(accept_tail(on.ifmac));
        push_rule(tx, &chain, &r, format!("{n} (owned fragments)"));
        let mut r = frag.to_vec();
        r.extend(count_and(counter::DROP_NOT_OWNER, &drop));
        push_rule(tx, &chain, &r, format!("{n} (foreign fragments)"));
    } else {
        let mut r = frag.to_vec();
        r.extend(count_and(counter::DROP_FRAGMENT, &drop));
        push_rule(tx, &chain, &r, format!("{n} (fragments)"));
    }
    for rule in effective_rules(&vip.rules) {
        let mut m = vec![
            expr::load(Base::Network, 9, 1, R0),
            expr::cmp(R0, Cmp::Eq, &[rule.proto]),
        ];
        if rule.port == 0 {
            m.extend(ports_readable());
        } else {
            m.push(expr::load(Base::Transport, 2, 2, R0));
            m.push(expr::cmp(R0, Cmp::Eq, &rule.port.to_be_bytes()));
        }
        let what = format!("{n} (proto {} port {})", rule.proto, rule.port);
        let mut r = m.clone();
        r.extend(owned_lookup(rule.filter, on.seed, slot));
        r.extend(accept_tail(on.ifmac));
        push_rule(tx, &chain, &r, format!("{what}, owned"));
        let mut r = m;
        r.extend(count_and(counter::DROP_NOT_OWNER, &drop));
        push_rule(tx, &chain, &r, format!("{what}, foreign"));
    }
    let mut r = ports_readable().to_vec();
    r.extend(count_and(counter::PASS_NO_RULE, &accept));
    push_rule(tx, &chain, &r, format!("{n} (no rule)"));
    push_rule(
        tx,
        &chain,
        &count_and(counter::DROP_MALFORMED, &drop),
        format!("{n} (ports cut off)"),
    );
}

/// The base chain's rules: a jump per VIP (once enabled), then the
/// counter of everything else.
fn base_rules(tx: &mut Tx, table: &Table, slots: &[Option<Vip>], enabled: bool) {
    let chain = Chain::new(BASE, table);
    flush(tx, &chain);
    if enabled {
        for (slot, vip) in slots.iter().enumerate() {
            let Some(vip) = vip else { continue };
            let r = [
                expr::meta(MetaKey::Protocol, R0),
                expr::cmp(R0, Cmp::Eq, &ETH_P_IP_BE),
                expr::load(Base::Network, 16, 4, R0),
                expr::cmp(R0, Cmp::Eq, &vip.addr.octets()),
                expr::verdict(&Verdict::Jump(chain_name(slot))),
            ];
            push_rule(tx, &chain, &r, format!("dispatch to VIP {}", vip.addr));
        }
    }
    push_rule(
        tx,
        &chain,
        &[expr::counter_ref(counter_name(counter::PASS_OTHER))],
        "counter of other traffic".to_owned(),
    );
}

impl NftFilter {
    /// Creates the table and its ingress chain on `interface` (replacing a
    /// leftover one), passing everything until [`NftFilter::enable`].
    /// `mode` is the XDP attach mode, meaningless here (same signature as
    /// `FarmFilter::attach`).
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self, NftError> {
        let _ = mode;
        let dev = cstring(interface);
        // SAFETY: `dev` is NUL-terminated; the call only reads it.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        if interface.is_empty() || ifindex == 0 {
            return Err(NftError::NoInterface(interface.to_owned()));
        }
        let mut nl = Netlink::open()?;
        let table_name = cstring(&format!("safekit_farm_{interface}"));
        let table = Table::new(&table_name, ProtoFamily::NetDev);
        let mut tx = Tx::new();
        // Add then delete: a leftover table without owner (left by an older
        // safekitd, or made by hand) goes, and the delete cannot fail when
        // there is none. A table owned by a live process is refused (EPERM):
        // another safekitd filters this interface. Then the table is created
        // owned by this socket: the kernel removes it when the socket closes,
        // so a killed daemon's node accepts nothing (SIGKILL included).
        tx.add(
            &table,
            MsgType::Add,
            "table (EPERM: another running safekitd owns it)",
        );
        tx.add(&table, MsgType::Del, "leftover table");
        tx.add(
            &TableMsg::new(&table_name, ProtoFamily::NetDev, TABLE_F_OWNER),
            MsgType::Add,
            "table owned by the daemon's netlink socket (Linux >= 5.12)",
        );
        for (_, name) in COUNTERS {
            let obj = Obj::counter(ProtoFamily::NetDev, &table_name, name);
            tx.add(
                &obj,
                MsgType::Add,
                format!("counter {}", name.to_string_lossy()),
            );
        }
        let mut chain = Chain::new(BASE, &table);
        // The netdev family numbers its ingress hook 0 (NF_NETDEV_INGRESS),
        // the number nftnl calls PreRouting.
        chain.set_hook(Hook::PreRouting, PRIORITY);
        chain.set_type(ChainType::Filter);
        chain.set_device(&dev);
        chain.set_policy(Policy::Accept);
        tx.add(
            &chain,
            MsgType::Add,
            format!("ingress chain on {interface}"),
        );
        base_rules(&mut tx, &table, &[], false);
        nl.apply("attaching the farm filter", tx)?;
        Ok(Self {
            nl: Mutex::new(nl),
            interface: interface.to_owned(),
            ifindex,
            table: table_name,
            arp: None,
            enabled: None,
            slots: vec![None; MAX_VIPS as usize],
        })
    }

    fn apply(&self, op: &'static str, tx: Tx) -> Result<(), NftError> {
        self.nl
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(op, tx)
    }

    fn table(&self) -> Table {
        Table::new(&self.table, ProtoFamily::NetDev)
    }

    fn filter_error(&self, what: &'static str) -> NftError {
        NftError::Filter {
            interface: self.interface.clone(),
            what,
        }
    }

    /// Turns filtering on (interface MAC, hash seed): every VIP's rules are
    /// written with them, then the dispatch to the VIPs; ARP requests for
    /// the VIPs are answered from then on.
    pub fn enable(&mut self, ifmac: [u8; 6], seed: u32) -> Result<(), NftError> {
        let on = Enabled { ifmac, seed };
        let table = self.table();
        let mut tx = Tx::new();
        for (slot, vip) in self.slots.iter().enumerate() {
            if let Some(vip) = vip {
                vip_rules(&mut tx, &table, slot, vip, on);
            }
        }
        base_rules(&mut tx, &table, &self.slots, true);
        self.apply("enabling the farm filter", tx)?;
        self.enabled = Some(on);
        if self.arp.as_ref().is_none_or(|a| a.ifmac() != ifmac) {
            self.arp = None;
            let arp =
                ArpResponder::start(&self.interface, self.ifindex, ifmac).map_err(|source| {
                    NftError::Arp {
                        interface: self.interface.clone(),
                        source,
                    }
                })?;
            self.arp = Some(arp);
        }
        self.sync_arp();
        Ok(())
    }

    fn sync_arp(&self) {
        if let Some(arp) = &self.arp {
            arp.set_vips(&self.vips());
        }
    }

    /// Declares a VIP, its virtual MAC and its rules; returns its slot (no
    /// bucket owned yet, also when the VIP was already declared).
    pub fn add_vip(
        &mut self,
        vip: Ipv4Addr,
        vmac: [u8; 6],
        rules: &[FilterRule],
    ) -> Result<u32, NftError> {
        let existing = self.slot_of(vip);
        let slot = match existing {
            Some(s) => s,
            None => self
                .slots
                .iter()
                .position(Option::is_none)
                .ok_or_else(|| self.filter_error("no free VIP slot (at most 16 farm VIPs)"))?,
        };
        let state = Vip {
            addr: vip,
            vmac,
            rules: rules.to_vec(),
            owned: vec![false; BUCKETS as usize],
        };
        let mut slots = self.slots.clone();
        slots[slot] = Some(state.clone());
        let table = self.table();
        let mut tx = Tx::new();
        if let Some(old) = existing.and_then(|s| self.slots[s].as_ref()) {
            // Declared again: owns nothing again.
            let mut set = Set::<Bucket>::new_named(
                &set_name(slot),
                set_id(slot),
                &table,
                ProtoFamily::NetDev,
            );
            for (b, _) in old.owned.iter().enumerate().filter(|(_, o)| **o) {
                set.add(&Bucket(bucket(b)));
            }
            tx.add_elems(&set, MsgType::Del, "owned buckets");
        } else {
            let set = owned_set(&table, slot);
            tx.add(&set, MsgType::Add, format!("set of owned buckets of {vip}"));
            let chain = Chain::new(chain_name(slot), &table);
            tx.add(&chain, MsgType::Add, format!("chain of {vip}"));
        }
        if let Some(on) = self.enabled {
            vip_rules(&mut tx, &table, slot, &state, on);
            base_rules(&mut tx, &table, &slots, true);
        }
        self.apply("declaring a VIP", tx)?;
        self.slots = slots;
        self.sync_arp();
        Ok(u32::try_from(slot).unwrap_or(u32::MAX))
    }

    /// True when no VIP is declared any more.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    fn slot_of(&self, vip: Ipv4Addr) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|v| v.addr == vip))
    }

    /// Forgets a VIP and its rules: its traffic is no longer filtered here.
    /// Its buckets are released first.
    pub fn remove_vip(&mut self, vip: Ipv4Addr, rules: &[FilterRule]) -> Result<(), NftError> {
        let _ = rules; // the filter knows the VIP's rules (same signature as FarmFilter)
        let Some(slot) = self.slot_of(vip) else {
            return Ok(());
        };
        self.set_owned(vip, &[false; BUCKETS as usize])?;
        let mut slots = self.slots.clone();
        slots[slot] = None;
        let table = self.table();
        let mut tx = Tx::new();
        base_rules(&mut tx, &table, &slots, self.enabled.is_some());
        let chain = Chain::new(chain_name(slot), &table);
        flush(&mut tx, &chain);
        tx.add(&chain, MsgType::Del, format!("chain of {vip}"));
        let set =
            Set::<Bucket>::new_named(&set_name(slot), set_id(slot), &table, ProtoFamily::NetDev);
        tx.add(&set, MsgType::Del, format!("set of owned buckets of {vip}"));
        self.apply("removing a VIP", tx)?;
        self.slots = slots;
        self.sync_arp();
        Ok(())
    }

    /// Sets bucket ownership. Buckets this node loses are released (one
    /// transaction) before any bucket it gains is taken (another one), so
    /// at no moment does it own a bucket it should not.
    pub fn set_owned(&mut self, vip: Ipv4Addr, owned: &[bool]) -> Result<(), NftError> {
        let slot = self
            .slot_of(vip)
            .ok_or_else(|| self.filter_error("no slot for this VIP (add_vip first)"))?;
        for gain in [false, true] {
            let Some(state) = self.slots[slot].as_ref() else {
                return Ok(());
            };
            let changes: Vec<usize> = owned
                .iter()
                .zip(&state.owned)
                .enumerate()
                .filter(|(_, (want, have))| *want != *have && **want == gain)
                .map(|(b, _)| b)
                .collect();
            if changes.is_empty() {
                continue;
            }
            let table = self.table();
            let mut set = Set::<Bucket>::new_named(
                &set_name(slot),
                set_id(slot),
                &table,
                ProtoFamily::NetDev,
            );
            for b in &changes {
                set.add(&Bucket(bucket(*b)));
            }
            let mut tx = Tx::new();
            let (ty, op) = if gain {
                (MsgType::Add, "taking buckets")
            } else {
                (MsgType::Del, "releasing buckets")
            };
            tx.add_elems(&set, ty, &format!("buckets of {vip}"));
            self.apply(op, tx)?;
            if let Some(state) = self.slots[slot].as_mut() {
                for b in changes {
                    state.owned[b] = gain;
                }
            }
        }
        Ok(())
    }

    /// Verdict counters, indexed by `safekit_common::counter` (`ARP_REPLY`:
    /// the replies of the user-space ARP responder).
    pub fn counters(&self) -> Result<Vec<u64>, NftError> {
        let by_name = self
            .nl
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters(ProtoFamily::NetDev, &self.table)?;
        let arp = self.arp.as_ref().map_or(0, ArpResponder::replies);
        Ok((0..counter::COUNT)
            .map(|i| {
                if i == counter::ARP_REPLY {
                    return arp;
                }
                COUNTERS
                    .iter()
                    .find(|(idx, _)| *idx == i)
                    .and_then(|(_, n)| by_name.get(n.to_string_lossy().as_ref()).copied())
                    .unwrap_or(0)
            })
            .collect())
    }

    /// The virtual MAC of each declared VIP (for an ARP responder in user
    /// space).
    #[must_use]
    pub fn vips(&self) -> Vec<(Ipv4Addr, [u8; 6])> {
        self.slots
            .iter()
            .flatten()
            .map(|v| (v.addr, v.vmac))
            .collect()
    }

    /// Name of the nftables table (`netdev safekit_farm_<interface>`).
    #[must_use]
    pub fn table_name(&self) -> String {
        self.table.to_string_lossy().into_owned()
    }
}

impl Drop for NftFilter {
    fn drop(&mut self) {
        // Ours (owned by `self.nl`): deleted here, or by the kernel when
        // the socket closes right after if this fails.
        let mut tx = Tx::new();
        tx.add(&self.table(), MsgType::Del, "table");
        if let Err(e) = self.apply("removing the farm filter", tx) {
            tracing::warn!(interface = %self.interface, "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_deduplicated_and_exact_ports_come_first() {
        let r = |proto, port, filter| FilterRule {
            proto,
            port,
            filter,
        };
        let got = effective_rules(&[
            r(PROTO_UDP, 0, 0),
            r(PROTO_TCP, 80, 0),
            r(1, 0, 0),
            r(PROTO_TCP, 80, 1),
            r(PROTO_TCP, 0, 0),
        ]);
        assert_eq!(
            got,
            vec![r(PROTO_TCP, 80, 1), r(PROTO_UDP, 0, 0), r(PROTO_TCP, 0, 0)]
        );
    }
}
