//! The I/O edge towards the kernel's network stack, one job per module:
//! virtual IPs over netlink, gratuitous ARP over `AF_PACKET`, the pause of
//! accept loops after an error.

pub mod accept;
pub mod arp;
pub mod vip;
