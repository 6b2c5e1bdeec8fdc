//! Gratuitous ARP from user space (XDP cannot originate frames): an
//! `AF_PACKET` socket bound to the interface sends an ARP request whose sender
//! and target are the VIP, announcing the MAC that should receive its traffic
//! (the node's own for a mirror VIP, the virtual MAC for a farm VIP). The
//! Ethernet source is always the node's own MAC, so a farm's virtual MAC is
//! never learnt by a bridge or switch.

use std::{net::Ipv4Addr, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

/// The gratuitous ARP frame: broadcast from `eth_src`, `who-has VIP tell
/// VIP` at `mac`.
#[must_use]
pub fn garp_frame(eth_src: [u8; 6], mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&eth_src);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op request.
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&vip.octets());
    // Target hardware address zero, target protocol address = VIP.
    f[38..42].copy_from_slice(&vip.octets());
    f
}

/// The announcement of `vip` at `mac`, from `eth_src`: a gratuitous ARP
/// for IPv4, an unsolicited neighbour advertisement for IPv6.
#[must_use]
pub fn announcement(eth_src: [u8; 6], mac: [u8; 6], vip: std::net::IpAddr) -> Vec<u8> {
    match vip {
        std::net::IpAddr::V4(v) => garp_frame(eth_src, mac, v).to_vec(),
        std::net::IpAddr::V6(v) => super::ndp::unsolicited_na_frame(eth_src, mac, v).to_vec(),
    }
}

/// Sends `frame` on interface `ifindex` through a raw `AF_PACKET` socket.
pub fn send_frame(ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    // The frame's own EtherType (ARP, or IPv6 for neighbour advertisements).
    let proto = match frame.get(12..14) {
        Some(t) => u16::from_ne_bytes([t[0], t[1]]),
        None => return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
    };
    // SAFETY: socket(2) returns a new fd or -1; no memory is passed.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
    sa.sll_protocol = proto;
    sa.sll_ifindex = i32::try_from(ifindex).unwrap_or(0);
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&frame[0..6]);
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
    // SAFETY: the buffer and the address are valid for the given lengths
    // during the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sa).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_announces_the_vip_from_the_mac() {
        let mac = [0x5a, 0xfe, 10, 0, 0, 200];
        let own = [2, 0, 0, 0, 0, 1];
        let f = garp_frame(own, mac, Ipv4Addr::new(10, 0, 0, 200));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &own, "Ethernet source: the node's own MAC");
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[28..32], &[10, 0, 0, 200], "sender protocol address");
        assert_eq!(&f[38..42], &[10, 0, 0, 200], "target protocol address");
    }
}
