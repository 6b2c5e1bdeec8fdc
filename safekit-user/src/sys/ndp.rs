//! Unsolicited IPv6 neighbour advertisements from user space (the IPv6
//! counterpart of gratuitous ARP): sent to all nodes (`ff02::1`) from the
//! interface's own MAC, target the VIP, override flag, target link-layer
//! address option the MAC that should receive its traffic (the virtual MAC
//! of a farm VIP, the node's own for a mirror VIP). Receivers that already
//! have a neighbour entry for the VIP replace its link-layer address.

use std::net::Ipv6Addr;

/// Length of the frame: Ethernet, IPv6, advertisement with one option.
const FRAME_LEN: usize = 14 + 40 + 32;

/// The unsolicited advertisement frame for `vip` at `mac`, from `eth_src`.
#[must_use]
pub fn unsolicited_na_frame(eth_src: [u8; 6], mac: [u8; 6], vip: Ipv6Addr) -> [u8; FRAME_LEN] {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&eth_src);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    // IPv6: version 6, payload 32 bytes, ICMPv6, hop limit 255.
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&vip.octets());
    f[38..54].copy_from_slice(&all_nodes);
    // Advertisement: type 136, override flag, target, option 2 (target
    // link-layer address, 1 unit of 8 bytes).
    let m = 54;
    f[m] = 136;
    f[m + 4] = 0x20;
    f[m + 8..m + 24].copy_from_slice(&vip.octets());
    f[m + 24] = 2;
    f[m + 25] = 1;
    f[m + 26..m + 32].copy_from_slice(&mac);
    let sum = checksum(&vip.octets(), &all_nodes, &f[m..m + 32]);
    f[m + 2..m + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// `ICMPv6` checksum over the pseudo-header and `msg`.
fn checksum(src: &[u8; 16], dst: &[u8; 16], msg: &[u8]) -> u16 {
    let len = u32::try_from(msg.len()).unwrap_or(0);
    let mut sum: u32 = 0;
    for chunk in src.chunks(2).chain(dst.chunks(2)).chain(msg.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    sum += (len >> 16) + (len & 0xffff) + 58;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertisement_checks_out() {
        let vip: Ipv6Addr = "fd77:104::c8".parse().unwrap();
        let f = unsolicited_na_frame([2, 0, 0, 0, 0, 1], [0x5a, 0xfe, 0, 0, 0, 0xc8], vip);
        // Summing the pseudo-header and the message with its checksum
        // gives all ones.
        let all_nodes: [u8; 16] = f[38..54].try_into().unwrap();
        assert_eq!(checksum(&vip.octets(), &all_nodes, &f[54..]), 0);
        assert_eq!(&f[54 + 26..], &[0x5a, 0xfe, 0, 0, 0, 0xc8]);
        assert_eq!(f[54], 136);
        assert_eq!(f[21], 255, "hop limit 255, or receivers ignore it");
    }
}
