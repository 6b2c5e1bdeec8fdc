//! ARP for the VIPs when the farm filter is nftables: a netdev rule cannot
//! transmit a reply, so a thread answers the ARP requests for a VIP from
//! user space, on an `AF_PACKET` socket, exactly as the XDP program does in
//! the kernel: the reply gives the VIP's virtual MAC, and its Ethernet
//! source is the interface's own MAC (the virtual MAC never appears as a
//! source, so switches keep flooding VIP traffic to every node).
//!
//! The kernel itself does not answer: the daemon puts the VIP on loopback
//! and sets `arp_ignore` on the LAN interface.

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// `ETH_P_ARP` in network order, as `socket(2)` and `sockaddr_ll` want it.
const ETH_P_ARP_BE: u16 = 0x0806_u16.to_be();
/// How often the thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);
const ETH_HLEN: usize = 14;
const ARP_LEN: usize = 28;

type Vips = Arc<RwLock<BTreeMap<Ipv4Addr, [u8; 6]>>>;

/// The responder of one interface; stops when dropped.
#[derive(Debug)]
pub(crate) struct ArpResponder {
    ifmac: [u8; 6],
    vips: Vips,
    replies: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// The reply to an Ethernet/IPv4 ARP request for a VIP, or None.
pub(crate) fn reply(
    frame: &[u8],
    ifmac: [u8; 6],
    vips: &BTreeMap<Ipv4Addr, [u8; 6]>,
) -> Option<[u8; ETH_HLEN + ARP_LEN]> {
    let arp = frame.get(ETH_HLEN..ETH_HLEN + ARP_LEN)?;
    if frame.get(12..14)? != [0x08, 0x06] || arp[0..8] != [0, 1, 0x08, 0x00, 6, 4, 0, 1] {
        return None;
    }
    let tpa = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    let vmac = vips.get(&tpa)?;
    let (sha, spa) = (&arp[8..14], &arp[14..18]);
    let mut out = [0u8; ETH_HLEN + ARP_LEN];
    out[0..6].copy_from_slice(sha);
    out[6..12].copy_from_slice(&ifmac);
    out[12..14].copy_from_slice(&[0x08, 0x06]);
    let a = &mut out[ETH_HLEN..];
    a[0..8].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    a[8..14].copy_from_slice(vmac);
    a[14..18].copy_from_slice(&tpa.octets());
    a[18..24].copy_from_slice(sha);
    a[24..28].copy_from_slice(spa);
    Some(out)
}

impl ArpResponder {
    /// Opens the socket on `ifindex` (in the caller's network namespace)
    /// and starts the thread.
    pub(crate) fn start(interface: &str, ifindex: u32, ifmac: [u8; 6]) -> io::Result<Self> {
        // SAFETY: plain socket creation; the fd is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(ETH_P_ARP_BE),
            )
        };
        if raw < 0 {
            return Err(last_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(0);
        addr.sll_protocol = ETH_P_ARP_BE;
        addr.sll_ifindex = libc::c_int::try_from(ifindex).map_err(io::Error::other)?;
        let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or(0);
        // SAFETY: a valid sockaddr_ll and its size.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
            return Err(last_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: libc::suseconds_t::try_from(POLL.as_micros()).unwrap_or(200_000),
        };
        let tv_len = libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(0);
        // SAFETY: SO_RCVTIMEO with a valid timeval and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                tv_len,
            )
        };
        if rc != 0 {
            return Err(last_error());
        }
        let vips: Vips = Arc::default();
        let replies = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (vips, replies, stop) = (vips.clone(), replies.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("arp-{interface}"))
                .spawn(move || serve(&fd, ifmac, &vips, &replies, &stop))?
        };
        Ok(Self {
            ifmac,
            vips,
            replies,
            stop,
            thread: Some(thread),
        })
    }

    /// The VIPs answered for, with their virtual MACs.
    pub(crate) fn set_vips(&self, vips: &[(Ipv4Addr, [u8; 6])]) {
        let mut v = self.vips.write().unwrap_or_else(PoisonError::into_inner);
        *v = vips.iter().copied().collect();
    }

    /// The MAC replies are sent from.
    pub(crate) fn ifmac(&self) -> [u8; 6] {
        self.ifmac
    }

    /// Replies sent so far.
    pub(crate) fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }
}

fn serve(fd: &OwnedFd, ifmac: [u8; 6], vips: &Vips, replies: &AtomicU64, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or(0);
        // SAFETY: the buffer and the address are valid for their sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = last_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) && !warned
            {
                tracing::warn!("ARP responder: {e}");
                warned = true;
            }
            continue;
        };
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let out = {
            let v = vips.read().unwrap_or_else(PoisonError::into_inner);
            reply(&buf[..n], ifmac, &v)
        };
        let Some(out) = out else { continue };
        // SAFETY: the frame is valid for its length; the socket is bound
        // to the interface, so no address is needed.
        let sent = unsafe { libc::send(fd.as_raw_fd(), out.as_ptr().cast(), out.len(), 0) };
        if sent > 0 {
            replies.fetch_add(1, Ordering::Relaxed);
        } else if !warned {
            tracing::warn!("ARP responder: sending a reply: {}", last_error());
            warned = true;
        }
    }
}

impl Drop for ArpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_requests_for_a_vip_with_its_virtual_mac_from_the_interface_mac() {
        let ifmac = [2, 0, 0, 0, 0, 1];
        let vmac = [0x5a, 0xfe, 10, 0, 0, 9];
        let client = [2, 0, 0, 0, 0, 0xcc];
        let vips = BTreeMap::from([(Ipv4Addr::new(10, 0, 0, 9), vmac)]);
        let request = |op: u8, tpa: [u8; 4]| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&client);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, op]);
            f.extend_from_slice(&client);
            f.extend_from_slice(&[10, 0, 0, 50]);
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&tpa);
            f
        };
        let r = reply(&request(1, [10, 0, 0, 9]), ifmac, &vips).expect("a reply");
        assert_eq!(r[0..6], client);
        assert_eq!(r[6..12], ifmac);
        assert_eq!(r[ETH_HLEN + 6..ETH_HLEN + 8], [0, 2]);
        assert_eq!(r[ETH_HLEN + 8..ETH_HLEN + 14], vmac);
        assert_eq!(r[ETH_HLEN + 14..ETH_HLEN + 18], [10, 0, 0, 9]);
        assert_eq!(r[ETH_HLEN + 18..ETH_HLEN + 24], client);
        assert_eq!(r[ETH_HLEN + 24..ETH_HLEN + 28], [10, 0, 0, 50]);
        assert!(reply(&request(1, [10, 0, 0, 8]), ifmac, &vips).is_none());
        assert!(reply(&request(2, [10, 0, 0, 9]), ifmac, &vips).is_none());
        assert!(reply(&request(1, [10, 0, 0, 9])[..30], ifmac, &vips).is_none());
    }
}
