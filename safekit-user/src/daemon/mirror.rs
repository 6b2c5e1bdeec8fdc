//! Mirror modules in the daemon: the effects of becoming primary and of
//! stopping being primary (VIP, gratuitous ARP, scripts), run off the engine
//! task; the decisions are the pure core's (`crate::mirror`).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use tokio::task::JoinHandle;

use crate::{
    modlog::ModuleLog,
    script::{self, ScriptEnv},
    sys::{arp, lease::Lease, vip},
};

/// What the effects need to know.
#[derive(Debug, Clone)]
pub(super) struct MirrorJob {
    pub(super) module_dir: PathBuf,
    pub(super) interface: Option<String>,
    /// IPv4 and IPv6 VIPs.
    pub(super) vips: Vec<IpAddr>,
    pub(super) garp_count: u32,
    pub(super) garp_interval: Duration,
    /// `Some((interval, elapse))` when `arp_reroute` is on.
    pub(super) reroute: Option<(Duration, Duration)>,
    pub(super) tcp_reset: bool,
    pub(super) env: ScriptEnv,
    pub(super) nice_timeout: Duration,
    pub(super) force_timeout: Duration,
    pub(super) log: ModuleLog,
    /// Becomes true on `forcestop`: the running `prestart`, `start_prim` or
    /// nice `stop_prim` is killed, and the stop goes straight to `stop_prim
    /// force`.
    pub(super) force: tokio::sync::watch::Receiver<bool>,
    /// Split brain protection: the VIPs go before `stop_prim`, so no client
    /// reaches this node while the peer may be taking over.
    pub(super) fence_first: bool,
}

/// The module's VIPs are up on this node.
#[derive(Debug)]
pub struct PrimaryUp {
    pub(super) iface: Option<vip::Interface>,
    /// The ARP responder for the VIPs (tcx, held by a BPF link): dropped
    /// after the VIPs are removed; the kernel drops it if safekitd dies.
    pub(super) lease: Option<Box<Lease>>,
    /// Periodic gratuitous ARP (`arp_reroute`), stopped with the primary.
    pub(super) reroute: Option<JoinHandle<()>>,
    /// The replicated directories, mounted before `start_prim`.
    pub(super) rfs: Vec<crate::rfs::Primary>,
}

impl MirrorJob {
    /// True once `forcestop` was asked.
    fn forced(&self) -> bool {
        *self.force.borrow()
    }

    /// Completes when `forcestop` is asked (never if the module is gone).
    async fn until_forced(&self) {
        let mut rx = self.force.clone();
        if rx.wait_for(|forced| *forced).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs a script, logging failure; `Ok(())` when absent or successful.
/// `interruptible`: killed as soon as `forcestop` is asked.
async fn script(
    job: &MirrorJob,
    name: &str,
    args: &[&str],
    role: &str,
    timeout: Duration,
    interruptible: bool,
) -> Result<(), String> {
    let cancel = async {
        if interruptible {
            job.until_forced().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    script::run_until(
        &job.module_dir,
        name,
        args,
        role,
        &job.env,
        timeout,
        &job.log,
        cancel,
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// `prestart`: before the module runs in any role; the engine holds
/// `start_prim` until it finished.
pub(super) async fn prestart(job: MirrorJob) -> Result<(), String> {
    script(&job, "prestart", &[], "none", job.nice_timeout, true).await
}

/// `poststop`: once the module stopped in every role, after `stop_prim`.
pub(super) async fn poststop(job: MirrorJob) -> Result<(), String> {
    script(&job, "poststop", &[], "none", job.nice_timeout, false).await
}

/// Becomes primary: VIPs on loopback (/32), answered for on the LAN
/// interface of their subnet only by the lease (the tcx ARP responder held
/// by this process: `sys::lease`), announced by gratuitous ARP from this
/// node's MAC, then `start_prim`.
pub(super) async fn primary_up(job: MirrorJob) -> Result<PrimaryUp, String> {
    if job.forced() {
        return Err("forcestop asked: not becoming primary".to_owned());
    }
    let mut iface = None;
    let mut lease = None;
    if let Some(first) = job.vips.first().copied() {
        let handle = vip::connect().map_err(|e| e.to_string())?;
        let i = vip::find_interface(&handle, first, job.interface.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        let mut l = Lease::attach(&i).map_err(|e| e.to_string())?;
        // The LAN interface answers ARP only for its own addresses: the VIP
        // is answered by the lease alone.
        vip::arp_only_own_addresses(&i.name)
            .map_err(|e| format!("setting arp_ignore/arp_announce on {}: {e}", i.name))?;
        let lo = vip::loopback(&handle).await.map_err(|e| e.to_string())?;
        for v in &job.vips {
            let added = match v {
                // IPv4: on loopback, answered only by the lease.
                IpAddr::V4(v4) => match vip::add(&handle, &lo, *v, vip::host_prefix(*v)).await {
                    Ok(()) => l.add(*v4).map_err(|e| e.to_string()).map(|()| {
                        format!(
                            "VIP {v} set (lo), ARP answered on {} while safekitd lives",
                            i.name
                        )
                    }),
                    Err(e) => Err(e.to_string()),
                },
                // IPv6: on the LAN interface with its subnet's prefix,
                // announced by unsolicited neighbour advertisements (the
                // lease answers ARP, IPv4 only).
                IpAddr::V6(_) => {
                    let prefix = if v.is_ipv6() == first.is_ipv6() {
                        i.prefix
                    } else {
                        vip::find_interface(&handle, *v, Some(&i.name))
                            .await
                            .map_or(vip::host_prefix(*v), |o| o.prefix)
                    };
                    vip::add(&handle, &i, *v, prefix)
                        .await
                        .map_err(|e| e.to_string())
                        .map(|()| format!("VIP {v}/{prefix} set on {}", i.name))
                }
            };
            match added {
                Ok(line) => job.log.info(&line),
                Err(e) => {
                    // Nothing is handed to the engine: release what was taken.
                    let mut errors = vec![e];
                    remove_vips(&job, &i, &mut errors).await;
                    return Err(errors.join("; "));
                }
            }
        }
        iface = Some(i);
        lease = Some(Box::new(l));
    }
    // The gratuitous ARP burst runs beside `start_prim`: the first
    // announcement goes out now, the rest while the application starts.
    let burst = iface.as_ref().map(|i| spawn_announce(&job, i));
    let reroute = match (&iface, job.reroute) {
        (Some(i), Some((every, elapse))) => {
            let (i, vips, log) = (i.clone(), job.vips.clone(), job.log.clone());
            Some(tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                while start.elapsed() < elapse {
                    tokio::time::sleep(every).await;
                    announce(&i, &vips, 1, Duration::ZERO, &log).await;
                }
            }))
        }
        _ => None,
    };
    if let Err(e) = script(&job, "start_prim", &[], "prim", job.nice_timeout, true).await {
        // Nothing is handed to the engine: release what was taken here.
        for h in reroute.iter().chain(&burst) {
            h.abort();
        }
        let mut errors = vec![e];
        if let Some(i) = &iface {
            remove_vips(&job, i, &mut errors).await;
        }
        return Err(errors.join("; "));
    }
    Ok(PrimaryUp {
        iface,
        lease,
        reroute,
        rfs: Vec::new(),
    })
}

/// Stops being primary: `stop_prim` (then `stop_prim force` if it fails,
/// times out or `forcestop` interrupts it; `forcestop` asked before: `stop_prim
/// force` alone), TCP connections to the VIP reset when configured (while
/// the VIP is still here, so that the resets reach the clients), VIP
/// removed.
pub(super) async fn primary_down(job: MirrorJob, up: Option<PrimaryUp>) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Some(h) = up.as_ref().and_then(|u| u.reroute.as_ref()) {
        h.abort();
    }
    let (mut iface, mut lease) = up.map_or((None, None), |u| (u.iface, u.lease));
    if job.fence_first {
        release_vips(&job, iface.take(), lease.take(), &mut errors).await;
        job.log.info(
            "fenced before stop_prim: the VIPs are gone, no client reaches this node (split brain protection)",
        );
    }
    let run_force = if job.forced() {
        job.log
            .info("forcestop: stop_prim force without the nice stop_prim");
        true
    } else if let Err(e) = script(&job, "stop_prim", &[], "prim", job.nice_timeout, true).await {
        job.log.error(&format!("{e}: running stop_prim force"));
        true
    } else {
        false
    };
    if run_force {
        let force = script(
            &job,
            "stop_prim",
            &["force"],
            "prim",
            job.force_timeout,
            false,
        );
        if let Err(e) = force.await {
            errors.push(e);
        }
    }
    release_vips(&job, iface, lease, &mut errors).await;
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The VIPs leave: connections reset (`tcp_reset`), addresses removed, the
/// lease dropped (no ARP answered for them any more).
async fn release_vips(
    job: &MirrorJob,
    iface: Option<vip::Interface>,
    lease: Option<Box<Lease>>,
    errors: &mut Vec<String>,
) {
    if let Some(i) = &iface {
        if job.tcp_reset {
            for v in &job.vips {
                reset_connections(*v, &job.log).await;
            }
        }
        remove_vips(job, i, errors).await;
    }
    drop(lease);
}

/// Removes the module's VIPs from loopback (and from `i`, where an older
/// safekitd put them), collecting failures in `errors`.
async fn remove_vips(job: &MirrorJob, i: &vip::Interface, errors: &mut Vec<String>) {
    let handle = match vip::connect() {
        Ok(h) => h,
        Err(e) => return errors.push(e.to_string()),
    };
    let lo = match vip::loopback(&handle).await {
        Ok(lo) => lo,
        Err(e) => return errors.push(e.to_string()),
    };
    for v in &job.vips {
        for place in [&lo, i] {
            match vip::remove(&handle, place, *v).await {
                Ok(0) => {}
                Ok(_) => job
                    .log
                    .info(&format!("VIP {v} removed from {}", place.name)),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
}

/// Announces the VIPs by a gratuitous ARP burst (`garp_count` frames,
/// `garp_interval` apart) in a task of its own; the first frames are sent
/// before this returns.
pub(super) fn spawn_announce(job: &MirrorJob, i: &vip::Interface) -> JoinHandle<()> {
    for v in &job.vips {
        if let Err(e) = arp::send_frame(i.index, &arp::announcement(i.mac, i.mac, *v)) {
            job.log.error(&format!("announcing {v} on {}: {e}", i.name));
        }
    }
    let (i, vips, log) = (i.clone(), job.vips.clone(), job.log.clone());
    let (count, interval) = (job.garp_count.saturating_sub(1), job.garp_interval);
    tokio::spawn(async move {
        if count > 0 {
            tokio::time::sleep(interval).await;
            announce(&i, &vips, count, interval, &log).await;
        }
    })
}

/// A primary that kept its role across a partition or a split brain
/// announces its VIPs again at once (clients may hold the other node's MAC).
pub(super) fn reannounce(job: &MirrorJob, up: &PrimaryUp) {
    if let Some(i) = &up.iface {
        job.log.info(&format!(
            "announcing {} again by gratuitous ARP (this node keeps the primary role)",
            job.vips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        drop(spawn_announce(job, i));
    }
}

/// Gratuitous ARPs (IPv4) and unsolicited neighbour advertisements (IPv6)
/// for every VIP at the interface's MAC.
async fn announce(
    i: &vip::Interface,
    vips: &[IpAddr],
    count: u32,
    interval: Duration,
    log: &ModuleLog,
) {
    for n in 0..count.max(1) {
        for v in vips {
            if let Err(e) = arp::send_frame(i.index, &arp::announcement(i.mac, i.mac, *v)) {
                log.error(&format!("announcing {v} on {}: {e}", i.name));
                return;
            }
        }
        if n + 1 < count {
            tokio::time::sleep(interval).await;
        }
    }
}

/// `tcp_reset`: kills the sockets still bound to the VIP (`ss -K`, through
/// the kernel's `SOCK_DESTROY`), so clients reconnect at once to the new
/// primary instead of waiting for a timeout.
async fn reset_connections(v: IpAddr, log: &ModuleLog) {
    let out = tokio::process::Command::new("ss")
        .args(["-K", "src", &v.to_string()])
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => log.info(&format!("TCP connections of {v} reset")),
        Ok(o) => log.error(&format!(
            "tcp_reset for {v}: ss -K failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => log.error(&format!("tcp_reset for {v}: {e}")),
    }
}
