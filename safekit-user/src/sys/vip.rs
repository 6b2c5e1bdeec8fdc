//! Virtual IPs over rtnetlink: find the interface of a VIP's subnet, add the
//! VIP there, remove it.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::{LinkAttribute, LinkMessage},
    },
};

/// Errors of VIP management.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// Netlink failed.
    #[error("netlink {op}: {source}")]
    Netlink {
        /// Operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// No interface carries an address of the VIP's subnet.
    #[error("no interface has an address in the subnet of VIP {0} (name one with vip.interface)")]
    NoInterface(IpAddr),
    /// The named interface does not exist.
    #[error("interface {0:?} does not exist")]
    UnknownInterface(String),
    /// Opening the netlink socket failed.
    #[error("opening a netlink socket: {0}")]
    Open(#[from] std::io::Error),
}

/// The interface a VIP lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address.
    pub mac: [u8; 6],
    /// The interface's own address in the VIP's subnet (ARP sender of
    /// probes).
    pub addr: IpAddr,
    /// Prefix length of that subnet.
    pub prefix: u8,
}

/// A netlink handle driven by a task on the current runtime.
pub fn connect() -> Result<Handle, VipError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

fn in_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            if prefix == 0 {
                return true;
            }
            let mask = u32::MAX << (32 - u32::from(prefix.min(32)));
            (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            if prefix == 0 {
                return true;
            }
            let mask = u128::MAX << (128 - u32::from(prefix.min(128)));
            (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        _ => false,
    }
}

fn link_name_mac(link: &LinkMessage) -> (String, [u8; 6]) {
    let mut name = String::new();
    let mut mac = [0u8; 6];
    for a in &link.attributes {
        match a {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::Address(m) if m.len() == 6 => mac.copy_from_slice(m),
            _ => {}
        }
    }
    (name, mac)
}

/// The interface holding an address in `vip`'s subnet (or the one named),
/// ignoring addresses equal to the VIP itself.
pub async fn find_interface(
    handle: &Handle,
    vip: IpAddr,
    named: Option<&str>,
) -> Result<Interface, VipError> {
    let mut addrs = handle.address().get().execute();
    let mut best: Option<(u32, IpAddr, u8)> = None;
    while let Some(msg) = addrs.try_next().await.map_err(|source| VipError::Netlink {
        op: "address dump",
        source,
    })? {
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(v) | AddressAttribute::Address(v) => Some(*v),
            _ => None,
        });
        let Some(addr) = addr else { continue };
        if addr == vip || addr.is_loopback() || addr.is_ipv6() != vip.is_ipv6() {
            continue;
        }
        let prefix = msg.header.prefix_len;
        if in_subnet(addr, vip, prefix) && best.is_none_or(|(_, _, p)| prefix > p) {
            best = Some((msg.header.index, addr, prefix));
        }
    }
    if let Some(name) = named {
        let mut links = handle.link().get().match_name(name.to_owned()).execute();
        let link = links
            .try_next()
            .await
            .ok()
            .flatten()
            .ok_or_else(|| VipError::UnknownInterface(name.to_owned()))?;
        let (name, mac) = link_name_mac(&link);
        let (addr, prefix) = best
            .filter(|(i, _, _)| *i == link.header.index)
            .map_or_else(
                || {
                    if vip.is_ipv6() {
                        (IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 128)
                    } else {
                        (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32)
                    }
                },
                |(_, a, p)| (a, p),
            );
        return Ok(Interface {
            index: link.header.index,
            name,
            mac,
            addr,
            prefix,
        });
    }
    let (index, addr, prefix) = best.ok_or(VipError::NoInterface(vip))?;
    let mut links = handle.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(|source| VipError::Netlink {
            op: "link get",
            source,
        })?
        .ok_or(VipError::NoInterface(vip))?;
    let (name, mac) = link_name_mac(&link);
    Ok(Interface {
        index,
        name,
        mac,
        addr,
        prefix,
    })
}

/// The loopback interface, as a place for farm VIPs (/32): the stack accepts
/// their traffic while the LAN interface, with `arp_ignore = 1`, never
/// answers ARP for them (the XDP program does, with the virtual MAC).
pub async fn loopback(handle: &Handle) -> Result<Interface, VipError> {
    let mut links = handle.link().get().match_name("lo".to_owned()).execute();
    let link = links
        .try_next()
        .await
        .map_err(|source| VipError::Netlink {
            op: "link get",
            source,
        })?
        .ok_or_else(|| VipError::UnknownInterface("lo".into()))?;
    let (name, mac) = link_name_mac(&link);
    Ok(Interface {
        index: link.header.index,
        name,
        mac,
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        prefix: 32,
    })
}

/// Makes `iface` answer ARP only for its own addresses (`arp_ignore = 1`)
/// and never use another interface's address as ARP source
/// (`arp_announce = 2`): the LVS direct-routing settings.
pub fn arp_only_own_addresses(iface: &str) -> std::io::Result<()> {
    for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/{key}"), value)?;
    }
    Ok(())
}

/// Adds `vip` on `iface` with prefix length `prefix` (no error if present).
/// IPv6 addresses skip duplicate address detection: a VIP is usable at
/// once, and its takeover is announced by unsolicited advertisements.
pub async fn add(
    handle: &Handle,
    iface: &Interface,
    vip: IpAddr,
    prefix: u8,
) -> Result<(), VipError> {
    let mut req = handle.address().add(iface.index, vip, prefix);
    if vip.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(source) => Err(VipError::Netlink {
            op: "address add",
            source,
        }),
    }
}

/// Full-length prefix of an address (/32, /128): a VIP on loopback.
#[must_use]
pub fn host_prefix(vip: IpAddr) -> u8 {
    if vip.is_ipv6() { 128 } else { 32 }
}

/// Removes `vip` from `iface` (no error if absent); how many were removed.
pub async fn remove(handle: &Handle, iface: &Interface, vip: IpAddr) -> Result<usize, VipError> {
    let mut removed = 0;
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(iface.index)
        .set_address_filter(vip)
        .execute();
    while let Some(msg) = addrs.try_next().await.map_err(|source| VipError::Netlink {
        op: "address dump",
        source,
    })? {
        match handle.address().del(msg).execute().await {
            Ok(()) => removed += 1,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => {}
            Err(source) => {
                return Err(VipError::Netlink {
                    op: "address del",
                    source,
                });
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_membership() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = ip("10.77.1.1");
        assert!(in_subnet(a, ip("10.77.1.200"), 24));
        assert!(!in_subnet(a, ip("10.77.2.200"), 24));
        assert!(in_subnet(a, ip("10.77.2.200"), 16));
        let b = ip("fd77:104::1");
        assert!(in_subnet(b, ip("fd77:104::c8"), 64));
        assert!(!in_subnet(b, ip("fd77:105::c8"), 64));
        assert!(
            !in_subnet(a, ip("fd77:104::c8"), 0),
            "never across families"
        );
    }
}
