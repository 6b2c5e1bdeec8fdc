//! Farm modules in the daemon: the effects (XDP filter, VIP, scripts,
//! gratuitous ARP) that the engine runs off its task, and the per-module
//! runtime state the engine keeps.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use safekit_common::{BUCKETS, FILTER_CLIENT_IP, FILTER_CLIENT_IP_PORT, PROTO_TCP, PROTO_UDP};

use crate::{
    config::{Filter, ModuleConfig, Proto},
    farm::{
        filter::{FilterRule, default_mode},
        membership::View,
    },
    modlog::ModuleLog,
    nft::dataplane::{Backend, FarmDataplane},
    script::{self, ScriptEnv},
    sys::{arp, vip},
};

/// The XDP filters of this node, one per interface, shared by the farm
/// modules (an interface has one XDP program).
pub(crate) type Dataplane = Arc<Mutex<BTreeMap<String, FarmDataplane>>>;

/// Runtime of one farm module on this node.
#[derive(Debug)]
pub(super) struct FarmRt {
    pub(super) vips: Vec<IpAddr>,
    pub(super) vmac: [u8; 6],
    pub(super) rules: Vec<FilterRule>,
    pub(super) powers: BTreeMap<String, u32>,
    /// Interface, once the module is up.
    pub(super) iface: Option<vip::Interface>,
    /// Members this node believes UP (advertised in heartbeats).
    pub(super) view: View,
    /// Buckets written to the filter.
    pub(super) owned: Vec<bool>,
    /// A graceful stop in progress: buckets released, the service still
    /// serving the node's established connections.
    pub(super) drain: Option<Drain>,
    /// `farm.drain_timeout`.
    pub(super) drain_timeout: Duration,
    /// The lease deadline last written to the filter (`CLOCK_MONOTONIC`
    /// ns; 0: none yet).
    pub(super) lease: u64,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub(super) fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes the timespec it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid timespec pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A farm module draining (graceful stop).
#[derive(Debug, Clone, Copy)]
pub(super) struct Drain {
    /// `stop_both` runs at this time at the latest.
    pub(super) until: std::time::Instant,
    /// Next count of the connections left.
    pub(super) next_check: std::time::Instant,
    /// Connections left at the last count.
    pub(super) left: u32,
}

/// How often a draining module counts its connections.
pub(super) const DRAIN_CHECK: Duration = Duration::from_millis(200);

/// TCP connections of this network namespace whose local address is one of
/// `vips`, in `/proc/net/tcp` and `/proc/net/tcp6` text: every state but
/// listening, `TIME_WAIT` and closed (a connection still to serve or to
/// finish closing).
#[must_use]
pub(super) fn connections_to(vips: &[IpAddr], tcp: &str, tcp6: &str) -> u32 {
    let local = |hex: &str| -> Option<IpAddr> {
        let (addr, _port) = hex.split_once(':')?;
        match addr.len() {
            8 => {
                let v = u32::from_str_radix(addr, 16).ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(v.to_ne_bytes())))
            }
            32 => {
                let mut b = [0u8; 16];
                for i in 0..4 {
                    let v = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                    b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
                }
                Some(IpAddr::V6(std::net::Ipv6Addr::from(b)))
            }
            _ => None,
        }
    };
    let mut n = 0u32;
    for line in tcp.lines().skip(1).chain(tcp6.lines().skip(1)) {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(l), Some(_remote), Some(st)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // 06 TIME_WAIT, 07 CLOSE, 0A LISTEN.
        if matches!(st, "06" | "07" | "0A") {
            continue;
        }
        if local(l).is_some_and(|a| vips.contains(&a)) {
            n += 1;
        }
    }
    n
}

/// [`connections_to`] on this namespace's `/proc/net/tcp{,6}`.
pub(super) fn count_connections(vips: &[IpAddr]) -> std::io::Result<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp")?;
    let tcp6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    Ok(connections_to(vips, &tcp, &tcp6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_left_count_only_live_connections_of_the_vips() {
        // Lines as the kernel prints them (little-endian host): VIP
        // 10.77.101.200 is C8654D0A, port 80 is 0050.
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: C8654D0A:0050 FA654D0A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: C8654D0A:0050 FA654D0A:9C41 06 00000000:00000000 03:00000F9B 00000000     0        0 0 3 0000000000000000
   3: C8654D0A:0050 FA654D0A:9C42 08 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:0050 0100007F:9C43 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 20 4 30 10 -1
";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 010177FD0000000000000000C8000000:0050 010177FD0000000000000000FA000000:A000 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000000000000 20 4 30 10 -1
";
        let v4: IpAddr = "10.77.101.200".parse().unwrap();
        let v6: IpAddr = "fd77:101::c8".parse().unwrap();
        // ESTABLISHED and CLOSE_WAIT count; LISTEN, TIME_WAIT and other
        // addresses do not.
        assert_eq!(connections_to(&[v4], tcp, tcp6), 2);
        assert_eq!(connections_to(&[v6], tcp, tcp6), 1);
        assert_eq!(connections_to(&[v4, v6], tcp, tcp6), 3);
        assert_eq!(connections_to(&[], tcp, tcp6), 0);
    }
}

impl FarmRt {
    pub(super) fn new(cfg: &ModuleConfig) -> Self {
        let (vips, vmac, rules) = match &cfg.vip {
            Some(v) => (
                v.addrs.clone(),
                v.mac.unwrap_or([0x5a, 0xfe, 0, 0, 0, 0]),
                v.rules
                    .iter()
                    .map(|r| FilterRule {
                        proto: match r.proto {
                            Proto::Tcp => PROTO_TCP,
                            Proto::Udp => PROTO_UDP,
                        },
                        port: r.port,
                        filter: match r.filter {
                            Filter::ClientIp => FILTER_CLIENT_IP,
                            Filter::ClientIpPort => FILTER_CLIENT_IP_PORT,
                        },
                    })
                    .collect(),
            ),
            None => (Vec::new(), [0; 6], Vec::new()),
        };
        let powers = cfg
            .farm
            .as_ref()
            .map(|f| f.power.clone())
            .unwrap_or_default();
        Self {
            vips,
            vmac,
            rules,
            powers,
            iface: None,
            view: View::new(),
            owned: vec![false; BUCKETS as usize],
            drain: None,
            lease: 0,
            drain_timeout: cfg
                .farm
                .as_ref()
                .map_or(Duration::ZERO, |f| f.drain_timeout),
        }
    }

    /// Pushes the filter's lease on this module's VIPs to `now + timeout`
    /// (called as heartbeats are sent: the peers judge this node lost
    /// `timeout` after its last heartbeat, by which time the lease has
    /// lapsed). Returns true, writing nothing, when the previous lease had
    /// lapsed already (the daemon stalled): the caller must re-learn the
    /// membership before owning anything again.
    pub(super) fn refresh_lease(
        &mut self,
        dataplane: &Dataplane,
        timeout: Duration,
    ) -> Result<bool, String> {
        let Some(iface) = &self.iface else {
            return Ok(false);
        };
        let now = monotonic_ns();
        if self.lease != 0 && now > self.lease {
            self.lease = 0;
            return Ok(true);
        }
        let deadline = now + u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX / 2);
        let mut dp = dataplane
            .lock()
            .map_err(|_| "dataplane lock poisoned".to_owned())?;
        if let Some(f) = dp.get_mut(&iface.name) {
            for v in &self.vips {
                f.set_lease(*v, deadline).map_err(|e| e.to_string())?;
            }
        }
        self.lease = deadline;
        Ok(false)
    }

    /// Writes bucket ownership for every VIP of the module.
    pub(super) fn apply_owned(
        &mut self,
        dataplane: &Dataplane,
        owned: Vec<bool>,
    ) -> Result<(), String> {
        let Some(iface) = &self.iface else {
            self.owned = owned;
            return Ok(());
        };
        let mut dp = dataplane
            .lock()
            .map_err(|_| "dataplane lock poisoned".to_owned())?;
        if let Some(f) = dp.get_mut(&iface.name) {
            for v in &self.vips {
                f.set_owned(*v, &owned).map_err(|e| e.to_string())?;
            }
        }
        self.owned = owned;
        Ok(())
    }
}

/// Bucket of a client (IPv4 or IPv6), by address or address and port, as
/// the filter computes it (hash seed 0).
#[must_use]
pub(super) fn client_bucket(client: IpAddr, port: Option<u16>) -> u32 {
    use safekit_common::{
        bucket_client_ip, bucket_client_ip_port, bucket_client_ip6, bucket_client_ip6_port,
    };
    match (client, port) {
        (IpAddr::V4(a), None) => bucket_client_ip(a.octets(), 0),
        (IpAddr::V4(a), Some(p)) => bucket_client_ip_port(a.octets(), p.to_be_bytes(), 0),
        (IpAddr::V6(a), None) => bucket_client_ip6(a.octets(), 0),
        (IpAddr::V6(a), Some(p)) => bucket_client_ip6_port(a.octets(), p.to_be_bytes(), 0),
    }
}

/// What the effects need to know.
#[derive(Debug, Clone)]
pub(super) struct FarmJob {
    pub(super) module_dir: PathBuf,
    pub(super) interface: Option<String>,
    pub(super) vips: Vec<IpAddr>,
    pub(super) vmac: [u8; 6],
    pub(super) rules: Vec<FilterRule>,
    pub(super) env: ScriptEnv,
    pub(super) script_timeout: Duration,
    pub(super) log: ModuleLog,
    pub(super) dataplane: Dataplane,
    pub(super) backend: Backend,
}

/// Brings the data plane up: interface of the VIP subnet, XDP filter
/// attached there (shared), VIPs declared to it with no bucket owned, VIP
/// addresses added so the stack accepts the traffic, then `start_both`.
pub(super) async fn up(job: FarmJob) -> Result<vip::Interface, String> {
    let first = *job.vips.first().ok_or("no VIP configured")?;
    let handle = vip::connect().map_err(|e| e.to_string())?;
    let iface = vip::find_interface(&handle, first, job.interface.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    {
        let mut dp = job
            .dataplane
            .lock()
            .map_err(|_| "dataplane lock poisoned".to_owned())?;
        if !dp.contains_key(&iface.name) {
            let mode = default_mode(&iface.name);
            let mut f =
                FarmDataplane::attach(job.backend, &iface.name, mode).map_err(|e| e.to_string())?;
            f.enable(iface.mac, 0).map_err(|e| e.to_string())?;
            job.log.info(&format!(
                "{} farm filter attached on {} (XDP mode if XDP: {mode:?}){}",
                f.kind(),
                iface.name,
                if f.forwards_ebpf_logs() {
                    "; its eBPF log records go to the daemon log"
                } else {
                    ""
                }
            ));
            dp.insert(iface.name.clone(), f);
        }
        let f = dp.get_mut(&iface.name).ok_or("filter vanished")?;
        for v in &job.vips {
            f.add_vip(*v, job.vmac, &job.rules)
                .map_err(|e| e.to_string())?;
        }
    }
    // The VIP goes on loopback (/32) so the stack accepts what the filter
    // passes, while the LAN interface never answers ARP for it: only the XDP
    // program does, with the virtual MAC (also after a crash of safekitd).
    vip::arp_only_own_addresses(&iface.name)
        .map_err(|e| format!("setting arp_ignore/arp_announce on {}: {e}", iface.name))?;
    let lo = vip::loopback(&handle).await.map_err(|e| e.to_string())?;
    for v in &job.vips {
        vip::add(&handle, &lo, *v, vip::host_prefix(*v))
            .await
            .map_err(|e| e.to_string())?;
        job.log
            .info(&format!("VIP {v} set (lo), served through {}", iface.name));
    }
    script::run(
        &job.module_dir,
        "start_both",
        &[],
        "both",
        &job.env,
        job.script_timeout,
        &job.log,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(iface)
}

/// Takes the data plane down: VIPs forgotten by the filter (detached when
/// no VIP is left on the interface), `stop_both`, VIP addresses removed.
pub(super) async fn down(job: FarmJob, iface: Option<vip::Interface>) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Some(iface) = &iface
        && let Ok(mut dp) = job.dataplane.lock()
    {
        let empty = match dp.get_mut(&iface.name) {
            Some(f) => {
                for v in &job.vips {
                    if let Err(e) = f.remove_vip(*v, &job.rules) {
                        errors.push(e.to_string());
                    }
                }
                f.is_empty()
            }
            None => false,
        };
        if empty {
            dp.remove(&iface.name);
            job.log
                .info(&format!("farm filter detached from {}", iface.name));
        }
    }
    if let Err(e) = script::run(
        &job.module_dir,
        "stop_both",
        &[],
        "both",
        &job.env,
        job.script_timeout,
        &job.log,
    )
    .await
    {
        errors.push(e.to_string());
    }
    if iface.is_some() {
        match vip::connect() {
            Ok(handle) => match vip::loopback(&handle).await {
                Ok(lo) => {
                    for v in &job.vips {
                        if let Err(e) = vip::remove(&handle, &lo, *v).await {
                            errors.push(e.to_string());
                        }
                    }
                }
                Err(e) => errors.push(e.to_string()),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Announces the VIPs at the virtual MAC: `count` gratuitous ARPs (IPv4)
/// or unsolicited neighbour advertisements (IPv6) spaced by `interval`,
/// sent from the interface's own MAC.
pub(super) async fn announce(
    iface: vip::Interface,
    vips: Vec<IpAddr>,
    vmac: [u8; 6],
    count: u32,
    interval: Duration,
    log: ModuleLog,
) {
    for i in 0..count.max(1) {
        for v in &vips {
            let frame = arp::announcement(iface.mac, vmac, *v);
            if let Err(e) = arp::send_frame(iface.index, &frame) {
                log.error(&format!("announcing {v} on {}: {e}", iface.name));
                return;
            }
        }
        if i + 1 < count {
            tokio::time::sleep(interval).await;
        }
    }
}
