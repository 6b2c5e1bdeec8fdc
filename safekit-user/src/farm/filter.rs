//! The I/O edge of the farm data plane: loads the embedded XDP program,
//! attaches it to the LAN interface through a BPF link (detached by the
//! kernel when the daemon dies), starts the reader of its aya-log records,
//! and writes its maps (VIPs, rules, bucket ownership, interface settings,
//! and the VIP index with each VIP's rules inline: the program's fast path).
//! Reads the per-CPU verdict counters.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, links::FdLink},
};
use safekit_common::{
    BUCKETS, FilterConfig, InlineRule, MAX_VIPS, Rule6Key, RuleKey, RuleValue, SlotRules,
    VIP_FLAG_IP_ONLY, Vip6Key, VipIndex, VipKey, VipValue, counter, vip_index,
};

use crate::ebpf;

/// Errors of the farm filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Loading the object or a program failed.
    #[error("loading the XDP farm filter: {0}")]
    Load(#[from] aya::EbpfError),
    /// Verifier or attach failure.
    #[error("{op} the XDP farm filter on {interface}: {source}")]
    Program {
        /// What was being done.
        op: &'static str,
        /// Interface.
        interface: String,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map is missing from the object or has the wrong type.
    #[error("XDP farm filter map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The object lacks a map or program (build mismatch).
    #[error("the embedded eBPF object has no {0}")]
    Missing(&'static str),
    /// The kernel attached the program through netlink, not a BPF link: it
    /// would stay attached, with the last bucket ownership, if the daemon
    /// were killed; detached again and refused.
    #[error(
        "XDP farm filter on {0}: the kernel gave no BPF link (Linux >= 5.9 needed); a netlink-attached program would outlive a killed daemon"
    )]
    NoLink(String),
}

/// One balanced rule of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterRule {
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// Destination port, 0 = any.
    pub port: u16,
    /// `safekit_common::FILTER_CLIENT_IP` or `FILTER_CLIENT_IP_PORT`.
    pub filter: u32,
}

/// The rules of a VIP as the fast path reads them, one per (proto, port) as
/// in `RULES` (a later duplicate replaces an earlier one, as a map insert
/// does); None when they do not fit.
fn inline_rules(rules: &[FilterRule], flags: u16) -> Option<SlotRules> {
    let mut out = SlotRules {
        flags: u32::from(flags),
        ..SlotRules::default()
    };
    let mut n = 0;
    for r in rules {
        let rule = InlineRule {
            port_be: r.port.to_be(),
            proto: r.proto,
            pad: 0,
            filter: r.filter,
        };
        if let Some(same) = out.rules[..n]
            .iter_mut()
            .find(|x| x.proto == rule.proto && x.port_be == rule.port_be)
        {
            *same = rule;
        } else {
            *out.rules.get_mut(n)? = rule;
            n += 1;
        }
    }
    out.count = u32::try_from(n).ok()?;
    Some(out)
}

/// An object whose farm program is loaded and verified, waiting for the
/// first attach ([`FarmFilter::preload`]).
static PRELOADED: std::sync::Mutex<Option<Ebpf>> = std::sync::Mutex::new(None);

/// XDP attach mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Driver (native) mode.
    Native,
    /// Generic (skb) mode: works everywhere; needed on veth for `XDP_TX`
    /// unless the peer also runs XDP.
    Generic,
}

/// The attached filter and its maps.
pub struct FarmFilter {
    /// The BPF link attaching the program: its file descriptor is the
    /// attachment, so the kernel detaches the program when this value is
    /// dropped or the daemon dies (`kill -9` included): a dead daemon's node
    /// then accepts no VIP traffic.
    _link: FdLink,
    /// Forwards the program's aya-log records to the daemon's log (`None`
    /// when the reader could not start: the filter works without it).
    log: Option<ebpf::EbpfLog>,
    _bpf: Ebpf,
    interface: String,
    vips: HashMap<MapData, VipKey, VipValue>,
    rules: HashMap<MapData, RuleKey, RuleValue>,
    vips6: HashMap<MapData, Vip6Key, VipValue>,
    rules6: HashMap<MapData, Rule6Key, RuleValue>,
    owned: Array<MapData, u32>,
    lease: Array<MapData, u64>,
    config: Array<MapData, FilterConfig>,
    counters: PerCpuArray<MapData, u64>,
    index: Array<MapData, VipIndex>,
    slot_rules: Array<MapData, SlotRules>,
    /// Per slot: the VIP using it and the ownership last written.
    slots: Vec<Option<Slot>>,
}

/// What this process wrote for one VIP slot.
#[derive(Debug, Clone)]
struct Slot {
    vip: IpAddr,
    owned: Vec<bool>,
    /// Its rules inline in `SLOT_RULES` (None: too many, found in `RULES`).
    inline: Option<SlotRules>,
    /// Published in the VIP index (else found through `VIPS`).
    indexed: bool,
}

impl std::fmt::Debug for FarmFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarmFilter")
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

fn take<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, FilterError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf.take_map(name).ok_or(FilterError::Missing(name))?;
    T::try_from(map).map_err(|source| FilterError::Map { name, source })
}

/// Mode for an interface: generic on virtual pairs (veth: `iflink` differs
/// from `ifindex`), native elsewhere.
#[must_use]
pub fn default_mode(interface: &str) -> AttachMode {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{interface}/{f}"))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    match (read("ifindex"), read("iflink")) {
        (Some(a), Some(b)) if a != b => AttachMode::Generic,
        _ => AttachMode::Native,
    }
}

impl FarmFilter {
    /// Loads the program and attaches it to `interface`, passing everything
    /// until [`FarmFilter::enable`].
    pub fn attach(interface: &str, mode: AttachMode) -> Result<Self, FilterError> {
        let preloaded = PRELOADED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut bpf = match preloaded {
            Some(b) => b,
            None => Self::verified(interface)?,
        };
        // The reader owns the log ring buffer's map from here on (its fd
        // stays open for the program loaded with it).
        let log = match ebpf::EbpfLog::start(&mut bpf, &format!("XDP farm filter on {interface}")) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(interface, "{e}: the filter's log records will not be read");
                None
            }
        };
        let prog = Self::program(&mut bpf, interface)?;
        let xdp_mode = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        };
        let name = std::ffi::CString::new(interface)
            .map_err(|_| FilterError::Missing("interface name without NUL"))?;
        let id = prog
            .attach(name.as_c_str(), xdp_mode)
            .map_err(|source| FilterError::Program {
                op: "attaching",
                interface: interface.to_owned(),
                source,
            })?;
        let link = prog.take_link(id).map_err(|source| FilterError::Program {
            op: "taking the link of",
            interface: interface.to_owned(),
            source,
        })?;
        // A netlink attachment (no BPF link) is detached by this conversion
        // failing: only a link whose fd dies with the process is kept.
        let link = FdLink::try_from(link).map_err(|_| FilterError::NoLink(interface.to_owned()))?;
        Ok(Self {
            _link: link,
            log,
            vips: take(&mut bpf, "VIPS")?,
            rules: take(&mut bpf, "RULES")?,
            vips6: take(&mut bpf, "VIPS6")?,
            rules6: take(&mut bpf, "RULES6")?,
            lease: take(&mut bpf, "LEASE")?,
            owned: take(&mut bpf, "OWNED")?,
            config: take(&mut bpf, "CONFIG")?,
            counters: take(&mut bpf, "COUNTERS")?,
            index: take(&mut bpf, "VIP_INDEX")?,
            slot_rules: take(&mut bpf, "SLOT_RULES")?,
            _bpf: bpf,
            interface: interface.to_owned(),
            slots: vec![None; MAX_VIPS as usize],
        })
    }

    /// The farm program of `bpf`.
    fn program<'a>(bpf: &'a mut Ebpf, interface: &str) -> Result<&'a mut Xdp, FilterError> {
        bpf.program_mut(ebpf::FARM_PROGRAM)
            .ok_or(FilterError::Missing("safekit_farm program"))?
            .try_into()
            .map_err(|source| FilterError::Program {
                op: "typing",
                interface: interface.to_owned(),
                source,
            })
    }

    /// The embedded object with its farm program loaded (verified).
    fn verified(interface: &str) -> Result<Ebpf, FilterError> {
        let mut bpf = ebpf::load()?;
        Self::program(&mut bpf, interface)?
            .load()
            .map_err(|source| FilterError::Program {
                op: "verifying",
                interface: interface.to_owned(),
                source,
            })?;
        Ok(bpf)
    }

    /// Loads and verifies the program ahead of the first attach (the
    /// verifier takes a good part of a second on IPv6 and Neighbour
    /// Discovery paths): the daemon calls it at start, off its engine, so
    /// that starting a farm module attaches at once.
    pub fn preload() -> Result<(), FilterError> {
        let bpf = Self::verified("(preloaded)")?;
        *PRELOADED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bpf);
        Ok(())
    }

    /// True when the program's aya-log records are forwarded to the
    /// daemon's log.
    #[must_use]
    pub fn forwards_logs(&self) -> bool {
        self.log.is_some()
    }

    fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> FilterError {
        move |source| FilterError::Map { name, source }
    }

    /// Declares a VIP, its virtual MAC and its rules; returns its slot (no
    /// bucket owned yet).
    pub fn add_vip(
        &mut self,
        vip: impl Into<IpAddr>,
        vmac: [u8; 6],
        rules: &[FilterRule],
    ) -> Result<u32, FilterError> {
        let vip = vip.into();
        let slot = match self.slot_of(vip) {
            Some(s) => s,
            None => self
                .slots
                .iter()
                .position(Option::is_none)
                .and_then(|s| u32::try_from(s).ok())
                .ok_or(FilterError::Missing("free VIP slot (at most 16 farm VIPs)"))?,
        };
        // Off the fast path while its rules are rewritten (a VIP declared
        // again): until it is published anew, `VIPS` and `RULES` serve it.
        self.unpublish(slot)?;
        self.slots[slot as usize] = Some(Slot {
            vip,
            owned: vec![false; BUCKETS as usize],
            inline: None,
            indexed: false,
        });
        // A lease already lapsed until the daemon's first refresh.
        self.lease
            .set(slot, &1, 0)
            .map_err(Self::map_err("LEASE"))?;
        // Start from "owns nothing" in the kernel too.
        for b in 0..BUCKETS {
            self.owned
                .set(slot * BUCKETS + b, &0, 0)
                .map_err(Self::map_err("OWNED"))?;
        }
        let ip_only = rules
            .iter()
            .all(|r| r.filter == safekit_common::FILTER_CLIENT_IP);
        let flags = if ip_only { VIP_FLAG_IP_ONLY } else { 0 };
        let vip = match vip {
            IpAddr::V4(v) => v,
            IpAddr::V6(v6) => {
                // IPv6 VIPs: hash maps only (no index fast path).
                for r in rules {
                    let key = Rule6Key {
                        vip: v6.octets(),
                        port_be: r.port.to_be(),
                        proto: r.proto,
                        pad: 0,
                    };
                    self.rules6
                        .insert(&key, &RuleValue { filter: r.filter }, 0)
                        .map_err(Self::map_err("RULES6"))?;
                }
                let value = VipValue { vmac, flags, slot };
                self.vips6
                    .insert(&Vip6Key { addr: v6.octets() }, &value, 0)
                    .map_err(Self::map_err("VIPS6"))?;
                return Ok(slot);
            }
        };
        for r in rules {
            let key = RuleKey {
                vip: vip.octets(),
                port_be: r.port.to_be(),
                proto: r.proto,
                pad: 0,
            };
            self.rules
                .insert(&key, &RuleValue { filter: r.filter }, 0)
                .map_err(Self::map_err("RULES"))?;
        }
        let value = VipValue { vmac, flags, slot };
        self.vips
            .insert(&VipKey { addr: vip.octets() }, &value, 0)
            .map_err(Self::map_err("VIPS"))?;
        let inline = inline_rules(rules, flags);
        if let Some(r) = &inline {
            self.slot_rules
                .set(slot, r, 0)
                .map_err(Self::map_err("SLOT_RULES"))?;
        }
        if let Some(s) = self.slots[slot as usize].as_mut() {
            s.inline = inline;
        }
        self.publish(slot)?;
        Ok(slot)
    }

    /// Puts the VIP of `slot` in the VIP index if its rules are inline and
    /// its position is free: its packets then cost array lookups only.
    fn publish(&mut self, slot: u32) -> Result<(), FilterError> {
        let Some(s) = self.slots[slot as usize].as_ref() else {
            return Ok(());
        };
        let IpAddr::V4(v4) = s.vip else {
            return Ok(());
        };
        let pos = vip_index(v4.octets());
        let taken =
            self.slots.iter().flatten().any(|o| {
                o.indexed && matches!(o.vip, IpAddr::V4(a) if vip_index(a.octets()) == pos)
            });
        if s.indexed || s.inline.is_none() || taken {
            return Ok(());
        }
        let entry = VipIndex {
            addr: v4.octets(),
            slot_plus_one: slot + 1,
        };
        // Published last: its rules (SLOT_RULES), VIPS and RULES are
        // already written.
        self.index
            .set(pos, &entry, 0)
            .map_err(Self::map_err("VIP_INDEX"))?;
        if let Some(s) = self.slots[slot as usize].as_mut() {
            s.indexed = true;
        }
        Ok(())
    }

    /// Takes the VIP of `slot` out of the VIP index (first thing before its
    /// `SLOT_RULES` entry or its `VIPS` entry change).
    fn unpublish(&mut self, slot: u32) -> Result<(), FilterError> {
        let Some(s) = self.slots[slot as usize].as_mut() else {
            return Ok(());
        };
        let IpAddr::V4(v4) = s.vip else {
            return Ok(());
        };
        if !s.indexed {
            return Ok(());
        }
        self.index
            .set(vip_index(v4.octets()), &VipIndex::default(), 0)
            .map_err(Self::map_err("VIP_INDEX"))?;
        s.indexed = false;
        Ok(())
    }

    /// True when no VIP is declared any more.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    fn slot_of(&self, vip: IpAddr) -> Option<u32> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.vip == vip))
            .and_then(|s| u32::try_from(s).ok())
    }

    /// Forgets a VIP and its rules: its traffic is no longer filtered here.
    pub fn remove_vip(
        &mut self,
        vip: impl Into<IpAddr>,
        rules: &[FilterRule],
    ) -> Result<(), FilterError> {
        let vip = vip.into();
        let Some(slot) = self.slot_of(vip) else {
            return Ok(());
        };
        self.set_owned(vip, &[false; BUCKETS as usize])?;
        self.unpublish(slot)?;
        match vip {
            IpAddr::V4(vip) => {
                let _ = self.vips.remove(&VipKey { addr: vip.octets() });
                for r in rules {
                    let _ = self.rules.remove(&RuleKey {
                        vip: vip.octets(),
                        port_be: r.port.to_be(),
                        proto: r.proto,
                        pad: 0,
                    });
                }
            }
            IpAddr::V6(vip) => {
                let _ = self.vips6.remove(&Vip6Key { addr: vip.octets() });
                for r in rules {
                    let _ = self.rules6.remove(&Rule6Key {
                        vip: vip.octets(),
                        port_be: r.port.to_be(),
                        proto: r.proto,
                        pad: 0,
                    });
                }
            }
        }
        self.slots[slot as usize] = None;
        // Another VIP at the same index position can take the fast path.
        for other in 0..MAX_VIPS {
            self.publish(other)?;
        }
        Ok(())
    }

    /// Turns filtering on (interface MAC, hash seed).
    pub fn enable(&mut self, ifmac: [u8; 6], seed: u32) -> Result<(), FilterError> {
        let cfg = FilterConfig {
            ifmac,
            pad: [0; 2],
            seed,
            enabled: 1,
        };
        self.config.set(0, &cfg, 0).map_err(Self::map_err("CONFIG"))
    }

    /// Sets bucket ownership. Buckets this node loses are released before
    /// any bucket it gains is taken, so at no moment does it own a bucket it
    /// should not (each map element flips atomically).
    pub fn set_owned(&mut self, vip: impl Into<IpAddr>, owned: &[bool]) -> Result<(), FilterError> {
        let slot = self
            .slot_of(vip.into())
            .ok_or(FilterError::Missing("slot for this VIP (add_vip first)"))?;
        let Some(Slot { owned: current, .. }) = self.slots[slot as usize].as_mut() else {
            return Ok(());
        };
        for pass in [false, true] {
            for (b, (&want, have)) in owned.iter().zip(current.iter_mut()).enumerate() {
                if want != *have && want == pass {
                    let idx = slot * BUCKETS + u32::try_from(b).unwrap_or(u32::MAX);
                    self.owned
                        .set(idx, &u32::from(want), 0)
                        .map_err(Self::map_err("OWNED"))?;
                    *have = want;
                }
            }
        }
        Ok(())
    }

    /// Sets the daemon's lease on `vip`'s slot: its buckets take new
    /// traffic until `deadline_ns` (`CLOCK_MONOTONIC`, as
    /// `bpf_ktime_get_ns`).
    pub fn set_lease(
        &mut self,
        vip: impl Into<IpAddr>,
        deadline_ns: u64,
    ) -> Result<(), FilterError> {
        let slot = self
            .slot_of(vip.into())
            .ok_or(FilterError::Missing("slot for this VIP (add_vip first)"))?;
        self.lease
            .set(slot, &deadline_ns.max(1), 0)
            .map_err(Self::map_err("LEASE"))
    }

    /// Verdict counters summed over CPUs, indexed by
    /// `safekit_common::counter`.
    pub fn counters(&self) -> Result<Vec<u64>, FilterError> {
        (0..counter::COUNT)
            .map(|i| {
                self.counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(Self::map_err("COUNTERS"))
            })
            .collect()
    }
}
