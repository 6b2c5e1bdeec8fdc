//! The mirror VIP lease: the tcx ARP responder (`safekit_lease` in the
//! embedded eBPF object) attached to the LAN interface of a mirror primary's
//! VIPs, through a BPF link whose fd only this process holds (close-on-exec:
//! scripts and the application never inherit it).
//!
//! The VIPs themselves are on loopback (/32) and the interface has
//! `arp_ignore = 1`, so the program is the only thing on the node that
//! answers ARP for them, with the interface's own MAC. When safekitd dies —
//! `kill -9`, a panic, the OOM killer — the kernel releases the link with
//! the process's fds and the node stops answering for the VIPs at once,
//! whatever else survives. tcx (Linux 6.6) rather than XDP: the farm's XDP
//! program may already own the interface, and tcx programs chain.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{LinkOrder, SchedClassifier, TcAttach, TcAttachType, links::FdLink},
};
use safekit_common::{VipKey, lease::LeaseValue};

use crate::{ebpf, sys::vip::Interface};

/// Name of the lease program in the embedded object.
pub const LEASE_PROGRAM: &str = "safekit_lease";

/// Errors of the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Loading the object failed.
    #[error("loading the mirror VIP lease program: {0}")]
    Load(#[from] aya::EbpfError),
    /// Verifier or attach failure.
    #[error("{op} the mirror VIP lease program (tcx, Linux >= 6.6) on {interface}: {source}")]
    Program {
        /// What was being done.
        op: &'static str,
        /// Interface.
        interface: String,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The lease map refused an update.
    #[error("lease map, VIP {vip}: {source}")]
    Map {
        /// The VIP.
        vip: Ipv4Addr,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The object lacks the program or map (build mismatch).
    #[error("the embedded eBPF object has no {0}")]
    Missing(&'static str),
}

/// The lease of one interface: attached program and its VIP map. Dropping
/// it detaches the program (the node stops answering ARP for the VIPs).
pub struct Lease {
    /// The tcx link: its fd is the attachment.
    _link: FdLink,
    vips: HashMap<MapData, VipKey, LeaseValue>,
    _bpf: Ebpf,
    iface: Interface,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("interface", &self.iface.name)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Loads the program and attaches it at `iface`'s tcx ingress, answering
    /// for no VIP yet.
    pub fn attach(iface: &Interface) -> Result<Self, LeaseError> {
        let err = |op| {
            let interface = iface.name.clone();
            move |source| LeaseError::Program {
                op,
                interface,
                source,
            }
        };
        let mut bpf = ebpf::load()?;
        let prog: &mut SchedClassifier = bpf
            .program_mut(LEASE_PROGRAM)
            .ok_or(LeaseError::Missing("safekit_lease program"))?
            .try_into()
            .map_err(err("typing"))?;
        prog.load().map_err(err("verifying"))?;
        let id = prog
            .attach(
                iface.index,
                TcAttach::Tcx {
                    attach_type: TcAttachType::Ingress,
                    order: LinkOrder::default(),
                },
            )
            .map_err(err("attaching"))?;
        let link = prog.take_link(id).map_err(err("taking the link of"))?;
        let link = FdLink::try_from(link)
            .map_err(|e| err("holding the link of")(aya::programs::ProgramError::from(e)))?;
        let map = bpf
            .take_map("LEASE_VIPS")
            .ok_or(LeaseError::Missing("LEASE_VIPS map"))?;
        let vips = HashMap::try_from(map).map_err(|source| LeaseError::Map {
            vip: Ipv4Addr::UNSPECIFIED,
            source,
        })?;
        Ok(Self {
            _link: link,
            vips,
            _bpf: bpf,
            iface: iface.clone(),
        })
    }

    /// Answers ARP for `vip` from now on.
    pub fn add(&mut self, vip: Ipv4Addr) -> Result<(), LeaseError> {
        let value = LeaseValue {
            mac: self.iface.mac,
            pad: [0; 2],
            ifindex: self.iface.index,
        };
        self.vips
            .insert(&VipKey { addr: vip.octets() }, &value, 0)
            .map_err(|source| LeaseError::Map { vip, source })
    }

    /// The interface it is attached to.
    #[must_use]
    pub fn interface(&self) -> &Interface {
        &self.iface
    }
}
