//! The I/O edge towards the kernel's network stack, one job per module:
//! virtual IPs over netlink, gratuitous ARP and unsolicited neighbour
//! advertisements over `AF_PACKET`, the mirror VIP lease (tcx ARP responder
//! held by a BPF link), the pause of accept loops after an error.

pub mod accept;
pub mod arp;
pub mod cgroup;
pub mod lease;
pub mod ndp;
pub mod vip;
