//! The I/O edge towards the kernel's network stack, one job per module:
//! virtual IPs over netlink, gratuitous ARP and unsolicited neighbour
//! advertisements over `AF_PACKET`.

pub mod arp;
pub mod ndp;
pub mod vip;
