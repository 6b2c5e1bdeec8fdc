//! Either farm filter behind one type, so the daemon can pick the backend
//! from the configuration: XDP ([`FarmFilter`]), nftables ([`NftFilter`]),
//! or XDP with nftables where XDP cannot attach.

use std::net::IpAddr;

use crate::{
    farm::filter::{AttachMode, FarmFilter, FilterError, FilterRule},
    nft::{NftError, NftFilter},
};

/// Which filter to use on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The XDP program (the default: the fastest).
    #[default]
    Xdp,
    /// The nftables ruleset on the ingress hook.
    Nftables,
    /// XDP, or nftables when the XDP program cannot be loaded or attached.
    XdpOrNftables,
}

/// Errors of either backend.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// From the XDP filter (boxed: aya's errors are large).
    #[error(transparent)]
    Xdp(Box<FilterError>),
    /// From the nftables filter.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The nftables backend filters IPv4 only.
    #[error(
        "the nftables farm backend handles IPv4 VIPs only, not {0}: use filter = \"xdp\" for IPv6 VIPs"
    )]
    Ipv6OnNftables(IpAddr),
    /// Neither could attach.
    #[error("{xdp}; and the nftables fallback failed too: {nft}")]
    Both {
        /// Why XDP failed.
        xdp: Box<FilterError>,
        /// Why nftables failed.
        nft: NftError,
    },
}

impl From<FilterError> for DataplaneError {
    fn from(e: FilterError) -> Self {
        Self::Xdp(Box::new(e))
    }
}

/// The farm filter of one interface, whichever backend.
#[derive(Debug)]
pub enum FarmDataplane {
    /// XDP.
    Xdp(Box<FarmFilter>),
    /// nftables.
    Nft(Box<NftFilter>),
}

macro_rules! both {
    ($self:expr, $f:ident => $e:expr) => {
        match $self {
            FarmDataplane::Xdp($f) => Ok($e?),
            FarmDataplane::Nft($f) => Ok($e?),
        }
    };
}

impl FarmDataplane {
    /// Attaches the chosen backend to `interface` (`mode` is the XDP mode).
    pub fn attach(
        backend: Backend,
        interface: &str,
        mode: AttachMode,
    ) -> Result<Self, DataplaneError> {
        match backend {
            Backend::Xdp => Ok(Self::Xdp(Box::new(FarmFilter::attach(interface, mode)?))),
            Backend::Nftables => Ok(Self::Nft(Box::new(NftFilter::attach(interface, mode)?))),
            Backend::XdpOrNftables => match FarmFilter::attach(interface, mode) {
                Ok(f) => Ok(Self::Xdp(Box::new(f))),
                Err(xdp) => match NftFilter::attach(interface, mode) {
                    Ok(f) => {
                        tracing::warn!(interface, "{xdp}: using the nftables farm filter");
                        Ok(Self::Nft(Box::new(f)))
                    }
                    Err(nft) => Err(DataplaneError::Both {
                        xdp: Box::new(xdp),
                        nft,
                    }),
                },
            },
        }
    }

    /// "XDP" or "nftables".
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Xdp(_) => "XDP",
            Self::Nft(_) => "nftables",
        }
    }

    /// True when the XDP program's aya-log records reach the daemon's log
    /// ([`FarmFilter::forwards_logs`]; nftables has no such records).
    #[must_use]
    pub fn forwards_ebpf_logs(&self) -> bool {
        match self {
            Self::Xdp(f) => f.forwards_logs(),
            Self::Nft(_) => false,
        }
    }

    /// See [`FarmFilter::enable`].
    pub fn enable(&mut self, ifmac: [u8; 6], seed: u32) -> Result<(), DataplaneError> {
        both!(self, f => f.enable(ifmac, seed))
    }

    /// See [`FarmFilter::add_vip`].
    pub fn add_vip(
        &mut self,
        vip: IpAddr,
        vmac: [u8; 6],
        rules: &[FilterRule],
    ) -> Result<u32, DataplaneError> {
        match (self, vip) {
            (Self::Xdp(f), _) => Ok(f.add_vip(vip, vmac, rules)?),
            (Self::Nft(f), IpAddr::V4(v)) => Ok(f.add_vip(v, vmac, rules)?),
            (Self::Nft(_), IpAddr::V6(_)) => Err(DataplaneError::Ipv6OnNftables(vip)),
        }
    }

    /// See [`FarmFilter::set_owned`].
    pub fn set_owned(&mut self, vip: IpAddr, owned: &[bool]) -> Result<(), DataplaneError> {
        match (self, vip) {
            (Self::Xdp(f), _) => Ok(f.set_owned(vip, owned)?),
            (Self::Nft(f), IpAddr::V4(v)) => Ok(f.set_owned(v, owned)?),
            (Self::Nft(_), IpAddr::V6(_)) => Err(DataplaneError::Ipv6OnNftables(vip)),
        }
    }

    /// See [`FarmFilter::set_lease`]. The nftables backend has no lease
    /// (a stalled daemon's node keeps its buckets there).
    pub fn set_lease(&mut self, vip: IpAddr, deadline_ns: u64) -> Result<(), DataplaneError> {
        match self {
            Self::Xdp(f) => Ok(f.set_lease(vip, deadline_ns)?),
            Self::Nft(_) => Ok(()),
        }
    }

    /// See [`FarmFilter::remove_vip`].
    pub fn remove_vip(&mut self, vip: IpAddr, rules: &[FilterRule]) -> Result<(), DataplaneError> {
        match (self, vip) {
            (Self::Xdp(f), _) => Ok(f.remove_vip(vip, rules)?),
            (Self::Nft(f), IpAddr::V4(v)) => Ok(f.remove_vip(v, rules)?),
            (Self::Nft(_), IpAddr::V6(_)) => Ok(()),
        }
    }

    /// See [`FarmFilter::is_empty`].
    #[must_use]
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Xdp(f) => f.is_empty(),
            Self::Nft(f) => f.is_empty(),
        }
    }

    /// See [`FarmFilter::counters`].
    pub fn counters(&self) -> Result<Vec<u64>, DataplaneError> {
        both!(self, f => f.counters())
    }
}
